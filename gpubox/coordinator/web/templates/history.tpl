% rebase('layout', title='History', user=user, csrf=csrf)
<h1>History</h1>
<form method="get" action="/history" class="filters" role="search">
  <label>Status
    <select name="status">
% for value in ('', 'FINISHED', 'ERROR', 'CANCELLED', 'RUNNING', 'QUEUED'):
      <option value="{{value}}" {{'selected' if status == value else ''}}>{{value or 'any'}}</option>
% end
    </select>
  </label>
  <button type="submit">Filter</button>
</form>
<div class="scroll"><table class="jobs history">
  <thead><tr><th>Job</th><th>Name</th><th>Status</th><th>Submitter</th><th>GPUs</th><th>Duration</th><th>GPU-hours</th><th>Ended</th></tr></thead>
  <tbody>
% for v in jobs:
%   j = v.job
  <tr><td><a href="/jobs/{{j.id}}">{{j.id}}</a></td><td class="name">{{j.spec.name}}</td><td><span class="status status-{{j.status.value}}">{{j.status.value}}</span></td><td>{{j.spec.submitter or '-'}}</td><td>{{j.spec.gpus}}</td><td>{{'-' if j.duration is None else '%g s' % j.duration}}</td><td>{{'-' if v.gpu_hours is None else v.gpu_hours}}</td><td><time>{{j.finished_at and j.finished_at.strftime('%Y-%m-%d %H:%M:%S') or '-'}}</time></td></tr>
% end
  </tbody>
</table></div>
% if next:
<p><a href="/history?before={{next}}{{'&status=' + status if status else ''}}">Older jobs</a></p>
% end
<h2>GPU-hours</h2>
<p class="hint">Over the newest {{usage.jobs}} ended jobs, by the day they ended (UTC) and by submitter.</p>
<div class="columns">
<table class="usage"><thead><tr><th>Day</th><th>GPU-hours</th></tr></thead><tbody>
% for day, hours in usage.by_day:
  <tr><td>{{day}}</td><td>{{hours}}</td></tr>
% end
</tbody></table>
<table class="usage"><thead><tr><th>Submitter</th><th>GPU-hours</th></tr></thead><tbody>
% for who, hours in usage.by_submitter:
  <tr><td>{{who}}</td><td>{{hours}}</td></tr>
% end
</tbody></table>
</div>
