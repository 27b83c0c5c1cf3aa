"""A long-lived ClientApp executor for a deployment-engine SuperNode: one process that runs every message the node
receives, so the model, the data caches and the imports (torch, the app) are made once, not once a message.

Flower 1.41's SuperNode hands each message to a SuperExec that starts a fresh `flwr-clientapp` process for it; that
process imports torch and the app, builds the model, reads the client's data, trains and exits. Measured on the
tiny preset (3 local steps), each message cost 12-18 s of process life, of which 4-5 s were the training round
(2 s of it PyTorch's first optimizer, which imports torch._dynamo) and 4-5 s the app's imports; the simulation
engine's actors, which live for the run, spend about 0.5 s on the same round. `fedhubert supernode` therefore
starts flower-supernode with `--isolation process` and runs this executor beside it: it asks the node's Runtime API
for the next ClientApp task (AcquireTask, as flower-superexec does) and runs it in-process with the task's token,
pulling the message, context and FAB, and pushing the reply and the context back, exactly as
`flwr.supernode.runtime.run_clientapp` does for one task before it exits.

A task that raises is answered with an error reply (as Flower's own process does); a task aborted by a failed task
heartbeat (Flower raises SIGINT) ends with a failed status and the executor takes the next one. If a ClientApp kills
the process, `fedhubert supernode` starts a new executor and Flower expires the task."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from logging import ERROR, INFO, WARNING

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

# How often the executor asks for a task when none is waiting (flower-superexec's default is 1 s).
POLL_S = 0.05


class _Stop(BaseException):
    """SIGTERM: finish nothing more and exit (a BaseException, so that a task's error handling does not take it
    for the ClientApp's own error)."""


def _client(address: str, *interceptors) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeTracingInterceptor(), *interceptors],
        retry_invoker=make_simple_http_retry_invoker(),
    )


class Executor:
    """Runs the ClientApp tasks of one SuperNode's Runtime API (on loopback) in this process, one at a time."""

    def __init__(self, runtime_api_address: str):
        self.address = runtime_api_address
        self.apps: dict[str, ClientApp] = {}  # by FAB hash: each app is installed and imported once
        self.load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        self.tasks = 0

    def next_token(self, runtime: RuntimeHttpClient) -> str | None:
        answer = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
        return answer.token if answer.HasField("task") and answer.token else None

    def app(self, run, fab) -> ClientApp:
        client_app = self.apps.get(fab.hash_str)
        if client_app is None:
            install_from_fab(fab.content, skip_prompt=True)
            client_app = self.apps[fab.hash_str] = self.load(run.fab_id, run.fab_version, fab.hash_str)
        return client_app

    def run_task(self, token: str) -> None:
        """One task, as flwr-clientapp runs it: pull its input, call the ClientApp, push the reply and the
        context with the task's status."""
        client = _client(
            self.address,
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(client)
            reply = self.app(run, fab)(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except KeyboardInterrupt:  # Flower's task heartbeat failed: the SuperNode gave the task up
            details = "ClientApp task stopped: its heartbeat failed"
            log(WARNING, "%s", details)
        except Exception as error:  # the ClientApp's error becomes an error reply, as in flwr-clientapp
            code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(error)}:<'{error}'>"
            if isinstance(error, LoadClientAppError):
                code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "An exception was raised when loading `ClientApp`"
            log(ERROR, "ClientApp raised an exception", exc_info=error)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as error:  # the task's status is still pushed below
                log(ERROR, "Failed to push the reply", exc_info=error)
            push_task_output(client=client, context=context, sub_status=status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            self.tasks += 1

    def serve(self) -> None:
        runtime = _client(self.address, RuntimeVersionHttpInterceptor(component_name="SuperExec"))
        log(INFO, "fedhubert executor: serving the ClientApp tasks of the SuperNode at %s", self.address)
        try:
            while True:
                token = self.next_token(runtime)
                if token is None:
                    time.sleep(POLL_S)
                else:
                    self.run_task(token)
        finally:
            runtime.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    parser.add_argument("--flwr-home", required=True, help="the SuperNode's FLWR_HOME, where the apps are installed")
    args = parser.parse_args(argv)
    os.environ["FLWR_HOME"] = args.flwr_home

    def stop(_signum, _frame):
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    executor = Executor(args.runtime_api_address)
    try:
        executor.serve()
    except _Stop:
        log(INFO, "fedhubert executor: stopped after %d task(s)", executor.tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
