"""A provider's Batch API as one more way to run a job (``--mode batch``).

Modules, in the order a run meets them:

- ``ledger``: ``OUT/batches/ledger.jsonl``, the write-ahead journal of every call to
  the provider, and this OUT's token;
- ``chunks``: pending rows into request files (one model each, within the limits);
- ``api``: the Files and Batches endpoints over httpx (bounded, scrubbed, retried);
- ``lines``: output and error file lines into result rows (the synchronous parser);
- ``collect``: reconcile the ledger with the provider, collect ended batches, and
  the ids open batches hold;
- ``engine``: ``BatchEngine`` behind the engine seam, and ``collect_first`` for a
  synchronous run on an OUT with batches;
- ``listing``: ``pipeline batches OUT``.
"""
