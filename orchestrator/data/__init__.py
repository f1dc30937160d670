"""Training data without torch: token files, tokenizers, local datasets and their packed cache.

The driver (``meshpilot validate``, ``meshpilot data prepare``, ``meshpilot run`` before Ray
starts) prepares a dataset here; the workers only memory-map what it wrote
(:mod:`meshpilot.orchestrator.train.data` turns it into batches). Modules, lowest first:

- :mod:`.tokens`: the token file format (one writer, one reader), windows and loss masks;
- :mod:`.tokenizer`: the byte tokenizer, a model directory's ``tokenizer.json`` and chat template;
- :mod:`.reader`: local files (text, JSON lines, Parquet, a folder of them) read offline with the
  ``datasets`` library into documents of prompt and trained segments;
- :mod:`.prepare`: tokenize, pack into ``seq_len + 1`` windows with loss masks, split off the
  evaluation documents, and cache the result on disk under a fingerprint of its inputs.

Nothing here imports torch (tests/test_architecture.py runs the driver without it).
"""
