"""The Ray Serve application: a FastAPI ingress in front of a batched model deployment.

``serve_app.app:build_app`` is the typed application builder that ``serve_config.yaml``
names; ``serve_app.app.switch_model`` changes the served model in place. Importing this
package has no side effects (no Ray, torch or MLflow work happens at import time).
"""
