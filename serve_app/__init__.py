"""The Ray Serve application: a FastAPI ingress in front of a batched model deployment.

``serve_app.app:build_app`` is the typed application builder that ``serve_config.yaml``
names. This package is the request path only: the control plane deploys it and switches
its model through Serve (``monitoring.serving``) and never imports it. Importing this
package has no side effects (no Ray, torch or MLflow work happens at import time).
"""
