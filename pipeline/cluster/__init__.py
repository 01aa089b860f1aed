"""``--engine ray``: one run spread over a Ray cluster (the optional ``ray`` extra).

- ``engine``: the Ray engine (``RayEngine``) and its split workers, each running the
  same runner as a local run (``pipeline.local.build_runner``) on its split;
- ``coordinator``: the actor that keeps ``--concurrency``, ``--rpm``, ``--tpm`` and
  ``--max-cost`` job-wide and carries a stop to every worker;
- ``splits``: cutting inputs (local paths, globs, object-store URLs) into splits.

Nothing outside this package imports it, but for ``engine.ENGINES``, which names
the engine to import on use: a local run never imports Ray.
"""
