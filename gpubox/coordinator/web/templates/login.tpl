% rebase('layout', title='Sign in', user=None, csrf='')
<h1>Sign in</h1>
<form method="post" action="/login" class="login">
  <input type="hidden" name="next" value="{{next}}">
  <label for="token">API token</label>
  <input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
  <button type="submit">Sign in</button>
% if failed:
  <p class="error" role="alert">{{failed}}</p>
% end
  <p class="hint">A token from <code>gpubox token create NAME --role view</code> (read only),
  <code>submit</code> or <code>admin</code>; the local admin token is in the state folder's
  <code>token</code> file.</p>
</form>
