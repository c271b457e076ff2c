% rebase('layout', title='Tokens', user=user, csrf=csrf)
<h1>Tokens</h1>
% if made:
<div class="made" role="status">
  <p>Token <strong>{{made['name']}}</strong> ({{made['role']}}) made. It is shown this once:</p>
  <p><code class="token">{{made['token']}}</code></p>
</div>
% end
<div class="scroll"><table class="tokens">
  <thead><tr><th>Name</th><th>Role</th><th>Process workers</th><th>Caps</th><th>Made</th><th></th></tr></thead>
  <tbody>
% for t in tokens:
  <tr><td>{{t.name}}</td><td>{{t.role}}</td><td>{{'yes' if t.allow_process else 'no'}}</td><td>{{', '.join(f'{k} {v}' for k, v in t.caps.to_dict().items() if v is not None) or '—'}}</td><td><time>{{t.created_at.strftime('%Y-%m-%d %H:%M')}}</time></td><td>
    <form method="post" action="/tokens/{{quote(t.name)}}/revoke" class="inline" data-confirm="Revoke token {{t.name}}? Its sessions end too.">
      <input type="hidden" name="csrf" value="{{csrf}}">
      <button type="submit" class="danger">Revoke</button>
    </form>
  </td></tr>
% end
  </tbody>
</table></div>
<h2>Make a token</h2>
<form method="post" action="/tokens" class="make-token">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <label>Name <input name="name" required maxlength="100"></label>
  <label>Role
    <select name="role">
      <option value="view">view: reads only</option>
      <option value="submit" selected>submit: submits and cancels its own jobs</option>
      <option value="admin">admin: everything</option>
    </select>
  </label>
  <label><input type="checkbox" name="allow_process" value="1"> its jobs may run on process-runtime workers</label>
  <label>Max GPUs <input name="max_gpus" inputmode="numeric" pattern="[0-9]*" size="6" placeholder="no cap"></label>
  <label>Max running <input name="max_running" inputmode="numeric" pattern="[0-9]*" size="6" placeholder="no cap"></label>
  <label>Max queued <input name="max_queued" inputmode="numeric" pattern="[0-9]*" size="6" placeholder="no cap"></label>
  <button type="submit">Make</button>
</form>
