% if not workers:
<p class="empty">No worker has connected yet.</p>
% end
% for w in workers:
<section class="worker">
  <h2>{{w.name}} <span class="state {{'connected' if w.connected else 'lost'}}">{{'connected' if w.connected else 'lost'}}</span></h2>
  <p class="meta">version {{w.version}} · labels {{w.labels}} · mounts {{w.mounts}} · jobs at once {{w.max_jobs}} · last heartbeat <time>{{w.last_heartbeat}}</time></p>
  <p class="meta">running:
%   if w.running:
%     for job_id in w.running:
    <a href="/jobs/{{job_id}}">{{job_id}}</a>
%     end
%   else:
    none
%   end
  </p>
%   if w.gpus:
  <div class="scroll"><table class="gpus">
    <thead><tr><th>GPU</th><th>Model</th><th>UUID</th><th>Utilization %</th><th>Memory MiB</th><th>Power W</th><th>Job</th></tr></thead>
    <tbody>
%     for g in w.gpus:
    <tr><td>{{g.index}}</td><td>{{g.model}}</td><td><code>{{g.uuid}}</code></td><td>{{g.utilization}}</td><td>{{g.memory_used_mb}} / {{g.memory_mb}}</td><td>{{g.power_w}}</td><td>
%       if g.job:
      <a href="/jobs/{{g.job}}">{{g.job}}</a>
%       else:
      -
%       end
    </td></tr>
%     end
    </tbody>
  </table></div>
%   else:
  <p class="empty">No GPUs offered.</p>
%   end
</section>
% end
