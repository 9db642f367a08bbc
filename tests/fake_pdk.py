"""A minimal in-process PDK for unit tests of single modules (the end-to-end
tests drive the real plugin server through kong_standin instead)."""


class _Ns:
    pass


def fake_kong(headers=None, query=None, body=None, method="GET", path="/", host="api.test",
              ip="10.0.0.1"):
    """``body``: what Kong's get_body returns (a dict, or None for a body it cannot
    read)."""
    calls = []

    def rec(name, value):
        def call(*args):
            calls.append(name)
            return value
        return call

    kong = _Ns()
    kong.request = _Ns()
    kong.client = _Ns()
    kong.request.get_headers = rec("get_headers", {k.lower(): v if isinstance(v, list) else [v]
                                                   for k, v in (headers or {}).items()})
    kong.request.get_query = rec("get_query", query or {})
    kong.request.get_body = rec("get_body", body)
    kong.request.get_method = rec("get_method", method)
    kong.request.get_path = rec("get_path", path)
    kong.request.get_host = rec("get_host", host)
    kong.client.get_forwarded_ip = rec("get_forwarded_ip", ip)
    kong.calls = calls
    return kong
