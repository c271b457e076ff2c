"""The web dashboard, served by the coordinator at / beside the API (/api/v1): the queue,
each job with its live log and GPU charts, the workers, the history and the tokens.

Server-rendered pages (Bottle's templates, every value escaped), made live by one script of
our own (static/app.js) and two vendored libraries (static/vendor: htmx refreshes the queue
and workers, uPlot draws the charts); nothing is fetched from elsewhere. Signing in with an
API token opens a session (sessions.py); every page checks it and its role, every form its
CSRF token and origin, every answer carries a Content-Security-Policy (guard.py).
"""

from gpubox.coordinator.web.pages import add_routes
from gpubox.coordinator.web.sessions import Sessions

__all__ = ["Sessions", "add_routes"]
