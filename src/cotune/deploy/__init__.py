"""A real deployment over gRPC: the server process runs the driver and the server-side roles,
each device process hosts its role and dials out to the server (``engine.kind: grpc``).

``frames.py`` is the wire between processes (cotune's message format inside typed frames,
chunked), ``transport.py`` the gRPC plumbing (one bidirectional stream per device, TLS, token
authentication), ``server.py`` the server's engine and node host (remote roles behind
proxies), ``device.py`` a device process (``connect.py`` its streams, one per device it
hosts), ``launch.py`` the commands (serve, device, launch).
"""
