<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="htmx-config" content='{"includeIndicatorStyles": false, "allowEval": false, "allowScriptTags": false}'>
<title>{{title}} · gpubox</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/app.css">
% if get('charts', False):
<link rel="stylesheet" href="/static/vendor/uPlot.min.css">
<script src="/static/vendor/uPlot.iife.min.js" defer></script>
% end
<script src="/static/vendor/htmx.min.js" defer></script>
<script src="/static/app.js" defer></script>
</head>
<body>
<header>
  <nav aria-label="main">
    <a href="/" class="brand">gpubox</a>
% if user:
    <a href="/">Queue</a>
    <a href="/workers">Workers</a>
    <a href="/history">History</a>
%   if user.role == 'admin':
    <a href="/tokens">Tokens</a>
%   end
    <span class="who">{{user.name}} · {{user.role}}</span>
    <form method="post" action="/logout" class="inline">
      <input type="hidden" name="csrf" value="{{csrf}}">
      <button type="submit">Sign out</button>
    </form>
% end
  </nav>
</header>
<main>
{{!base}}
</main>
</body>
</html>
