"""Fine-tune a BERT text classifier, export it to ONNX, prove parity and write a model bundle.

Entry points: ``python -m training fit|evaluate`` (training/__main__.py), ``training.pipeline.fit`` and
``training.tiny.build_tiny_bundle`` for tests. The service never imports this package (it needs torch).
"""
