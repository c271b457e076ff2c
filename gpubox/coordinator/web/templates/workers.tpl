% rebase('layout', title='Workers', user=user, csrf=csrf)
<h1>Workers</h1>
<div id="workers" hx-get="/ui/workers" hx-trigger="every 1s" hx-swap="innerHTML">
% include('workers_rows', workers=workers)
</div>
