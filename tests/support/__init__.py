"""Helpers the tests share. A test module imports helpers from here, never from another
test module.

- ``wait``: ``wait_for`` / ``wait_for_sync``, conditions polled up to a deadline;
- ``grpc_api``: an in-process coordinator on a socket (``serve_api``) and calls on it;
- ``store_builders``: domain rows, and executions started straight in the store;
- ``engine_sim``: an execution driven through the pure engine step by step (``Sim``);
- ``fake_worker_service``: a fake WorkerService for the SDK's Worker;
- ``procs``: real coordinator and worker processes; ``tcp_proxy``: a TCP proxy to cut;
- ``cli``: the ``trellis`` command as a process; ``http``: the gateway over HTTP;
- ``faults``: what tests/e2e/fault_worker.py records, and execution histories;
- ``imports``: what the source imports, for the layering tests;
- ``*_worker.py``: worker scripts that e2e tests run as processes.
"""
