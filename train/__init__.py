"""segloop training core: data, transforms, models, losses, metrics, the Ray Train job.

Nothing here has import-time side effects; heavy dependencies (torch, ray, mlflow)
are imported by the submodules that need them.
"""
