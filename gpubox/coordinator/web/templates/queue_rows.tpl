<p class="counts">
% for status, count in queue.counts.items():
  <span class="status status-{{status}}">{{status}} {{count}}</span>
% end
</p>
<h2>Running</h2>
% if queue.running:
<div class="scroll"><table class="jobs running">
  <thead><tr><th>Job</th><th>Name</th><th>GPUs</th><th>Worker</th><th>Submitter</th><th>Age</th><th>Labels</th></tr></thead>
  <tbody>
% for row in queue.running:
  <tr><td><a href="/jobs/{{row.id}}">{{row.id}}</a></td><td class="name">{{row.name}}</td><td>{{row.gpus}}</td><td>{{row.worker}}</td><td>{{row.submitter}}</td><td>{{row.age}}</td><td>{{row.labels}}</td></tr>
% end
  </tbody>
</table></div>
% else:
<p class="empty">No job is running.</p>
% end
<h2>Queued, in the order they will start</h2>
% if queue.queued:
<div class="scroll"><table class="jobs queued">
  <thead><tr><th>#</th><th>Job</th><th>Name</th><th>GPUs</th><th>Why it waits</th><th>Submitter</th><th>Age</th><th>Labels</th></tr></thead>
  <tbody>
% for row in queue.queued:
  <tr><td>{{row.position}}</td><td><a href="/jobs/{{row.id}}">{{row.id}}</a></td><td class="name">{{row.name}}</td><td>{{row.gpus}}</td><td>{{row.reason or '-'}}</td><td>{{row.submitter}}</td><td>{{row.age}}</td><td>{{row.labels}}</td></tr>
% end
  </tbody>
</table></div>
% else:
<p class="empty">{{'No queued job matches the filters.' if queue.filtered and queue.queued_total else 'No job is queued.'}}</p>
% end
% if queue.queued_total > queue.queued_read:
<p class="more">The first {{queue.queued_read}} of {{queue.queued_total}} queued jobs are {{'searched' if queue.filtered else 'listed'}}.</p>
% end
