# Modules that run on import are not doctest material.
collect_ignore = ["setup.py", "flink_job/__main__.py"]
