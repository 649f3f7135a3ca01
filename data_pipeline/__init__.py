"""Raw text → sentencepiece → packed webdataset shards + manifest → exact, elastic, resumable loader.

The data layer knows no model: it never imports `trainer` or `launch`. See docs/data_pipeline.md.
"""
