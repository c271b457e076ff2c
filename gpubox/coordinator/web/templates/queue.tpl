% rebase('layout', title='Queue', user=user, csrf=csrf)
<h1>Queue</h1>
<form method="get" action="/" class="filters" role="search">
  <label>Status
    <select name="status">
% for value, shown in (('', 'running and queued'), ('RUNNING', 'running'), ('QUEUED', 'queued')):
      <option value="{{value}}" {{'selected' if filters.status == value else ''}}>{{shown}}</option>
% end
    </select>
  </label>
  <label>Label <input name="label" value="{{filters.label}}" placeholder="key=value"></label>
  <label>Submitter <input name="submitter" value="{{filters.submitter}}"></label>
  <label>Name <input name="name" value="{{filters.name}}"></label>
  <button type="submit">Filter</button>
</form>
<div id="queue" hx-get="/ui/queue?{{query}}" hx-trigger="every 1s" hx-swap="innerHTML">
% include('queue_rows', queue=queue)
</div>
