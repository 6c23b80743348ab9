"""Reports: read a workflow's results and render HTML, Markdown and PNG; never compute them."""
