% rebase('layout', title='Error', user=get('user'), csrf=get('csrf', ''))
<h1>{{status}}</h1>
<p class="error">{{message}}</p>
<p><a href="/">Back to the queue</a></p>
