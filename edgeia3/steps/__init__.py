"""Per-format steps: the exports and the GGUF merge that resolve and load bases
(``edgeia3.base``), validate and fold adapters, then drive a converter
(``edgeia3.converters``) and write the manifest. ``edgeia3.export`` and
``edgeia3.merge`` are their entry points; the converters never import these."""
