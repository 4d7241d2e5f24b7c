"""normfuse pipeline stages: export, rewrite, build, validate, bench, report, run."""
