"""An HTTP server that speaks AUTOMATIC1111's web API (`a1111`), runs jobs on one worker (`worker`, `engine`)
and serves a web page (`page.html`); `app.create_app` builds it, `scripts/serve.py` runs it."""
