% rebase('layout', title='Job ' + str(job.job.id), user=user, csrf=csrf, charts=True)
% j = job.job
<h1>Job {{j.id}} <span class="name">{{j.spec.name}}</span> <span class="status status-{{j.status.value}}">{{j.status.value}}</span></h1>
% if j.cancel_requested and job.live:
<p class="waiting while-live">Cancel requested: the job is being stopped.</p>
% elif may_cancel:
<form method="post" action="/jobs/{{j.id}}/cancel" class="inline while-live" data-confirm="Cancel job {{j.id}}?">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <button type="submit" class="danger">Cancel</button>
</form>
% end
% if reason:
<p class="waiting while-live">Waiting: {{reason}}</p>
% end
<h2>Log</h2>
<p class="log-tools">
  <a href="/api/v1/jobs/{{j.id}}/logs" download="job-{{j.id}}.log">Download the whole log</a>
  <span id="log-state" role="status"></span>
</p>
<button id="log-earlier" type="button" hidden>Load earlier lines</button>
<div id="log" class="log" data-job="{{j.id}}" data-last="{{j.log_seq}}" data-running="{{1 if job.live else 0}}" tabindex="0" role="log" aria-live="off" aria-label="log of job {{j.id}}"></div>
<h2>GPU telemetry</h2>
% if j.spec.gpus:
<div id="charts" class="charts" data-job="{{j.id}}" data-running="{{1 if job.live else 0}}"></div>
% else:
<p class="empty">None: the job asked for no GPU.</p>
% end
<div class="columns">
<section>
<h2>Details</h2>
<table class="details">
% for key, value in job.rows:
  <tr><th scope="row">{{key}}</th><td>{{value}}</td></tr>
% end
</table>
</section>
<section>
<h2>Timeline</h2>
<ol class="timeline">
% for event, when in job.timeline:
  <li><span class="event">{{event}}</span> <time>{{when}}</time></li>
% end
</ol>
<h2>GPUs</h2>
% if job.gpus:
<ul class="gpus">
%   for uuid, model in job.gpus:
  <li><code>{{uuid}}</code> {{model}}</li>
%   end
</ul>
% else:
<p class="empty">{{'None held' if j.spec.gpus else 'None asked for'}}.</p>
% end
% if job.telemetry:
% t = job.telemetry
<h2>GPU use</h2>
<table class="details">
  <tr><th scope="row">GPU-hours</th><td>{{job.gpu_hours}}</td></tr>
  <tr><th scope="row">utilization</th><td>mean {{t['util_mean']}} %, max {{t['util_max']}} %</td></tr>
  <tr><th scope="row">peak memory</th><td>{{t['memory_max_mb']}} MiB ({{t['memory_max_pct']}} % of the card)</td></tr>
  <tr><th scope="row">energy</th><td>{{'-' if t['energy_wh'] is None else str(t['energy_wh']) + ' Wh'}}</td></tr>
</table>
% end
</section>
</div>
