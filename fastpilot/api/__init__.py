"""HTTP layer: request parsing, responses, SSE framing, errors, middleware, playground."""
