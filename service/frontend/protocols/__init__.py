"""One module per protocol, each a ``routes(settings, plane) -> Routes`` over the neutral data plane: native,
Open Inference Protocol v2 over HTTP and over gRPC, TEI's and vLLM's classification dialects."""
