"""TLS and mTLS on the gateway's port: tritonclient over both, who is refused, a client certificate as
the caller's identity in the request log and the change log, certificate rotation without a restart,
and the warning for plaintext off loopback."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from certs import Authority, Pair
from conftest import GatewayProcess
from models import build_identity_repository
from tritonclient.utils import InferenceServerException

from gateway import config
from gateway.errors import ConfigError
from gateway.protocol import Stub, admin
from gateway.protocol import inference as pb
from gateway.requestlog.reader import LogReader
from gateway.tls import is_loopback

CLIENT_NAME = "ci-client"
RELOAD_INTERVAL_S = 0.2


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Pair
    client: Pair
    foreign_ca: Authority  # trusted by nobody here
    foreign_client: Pair  # a client certificate the gateway's client CA did not sign


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, foreign_ca = Authority.create(directory, "test-ca"), Authority.create(directory, "foreign-ca")
    return Pki(
        ca,
        ca.issue("server-1", server=True),
        ca.issue(CLIENT_NAME, server=False),
        foreign_ca,
        foreign_ca.issue("intruder", server=False),
    )


@pytest.fixture(scope="module")
def small_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_identity_repository(tmp_path_factory.mktemp("tls-models"))


def _tls_config(server: Pair, client_ca: Path | None = None, extra: str = "") -> str:
    text = f'[tls]\ncert_file = "{server.cert}"\nkey_file = "{server.key}"\nreload_interval_s = {RELOAD_INTERVAL_S}\n'
    if client_ca is not None:
        text += f'client_ca_file = "{client_ca}"\n'
    return text + extra


def _credentials(ca: Path, client: Pair | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        ca.read_bytes(),
        client.key.read_bytes() if client else None,
        client.cert.read_bytes() if client else None,
    )


def _triton(address: str, ca: Path, client: Pair | None = None) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        address,
        ssl=True,
        root_certificates=str(ca),
        private_key=str(client.key) if client else None,
        certificate_chain=str(client.cert) if client else None,
    )


def _infer(client: grpcclient.InferenceServerClient, request_id: str, **kwargs: object) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    tensor = grpcclient.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("identity_fp32", [tensor], request_id=request_id, **kwargs)
    np.testing.assert_array_equal(result.as_numpy("y"), x)


def _refused(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The status of a ServerLive call that the gateway's TLS must refuse."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        with pytest.raises(grpc.RpcError) as error:
            Stub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
    return error.value.code()


@pytest.fixture(scope="module")
def mtls(small_repository: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    # Certificate callers get "operator" here, so their traffic changes reach the change log; inference
    # needs a token, which a verified certificate stands in for.
    settings = _tls_config(pki.server, pki.ca.cert, 'client_cert_role = "operator"\n[auth]\ninference = "token"\n')
    gateway = GatewayProcess(small_repository, settings, tmp_path_factory.mktemp("mtls"))
    gateway.wait_ready(credentials=_credentials(pki.ca.cert, pki.client))
    yield gateway
    assert gateway.stop() == 0, gateway.log


def test_tritonclient_over_mtls_the_certificate_names_the_caller(mtls: GatewayProcess, pki: Pki) -> None:
    assert "(mTLS)" in mtls.log
    client = _triton(mtls.address, pki.ca.cert, pki.client)
    _infer(client, "mtls-cert")
    token = (mtls.state_dir / "admin.token").read_text().strip()
    _infer(client, "mtls-token", headers={"authorization": f"Bearer {token}"})  # a token, when sent, wins
    with pytest.raises(InferenceServerException, match="unknown or revoked token"):  # even a wrong one
        _infer(client, "mtls-bad-token", headers={"authorization": "Bearer cgw_wrong"})
    client.close()
    reader = LogReader(mtls.state_dir / "log")
    assert [r.caller for r in reader.get("mtls-cert")] == [f"cert:{CLIENT_NAME}"]
    assert [r.caller for r in reader.get("mtls-token")] == ["bootstrap-admin"]


def test_the_certificate_caller_in_the_admin_api_and_change_log(mtls: GatewayProcess, pki: Pki) -> None:
    with grpc.secure_channel(mtls.address, _credentials(pki.ca.cert, pki.client)) as channel:
        ops = Stub(channel, admin.AdminService)
        me = ops.WhoAmI(admin.WhoAmIRequest(), timeout=10)
        assert (me.name, me.role) == (f"cert:{CLIENT_NAME}", "operator")
        split = [admin.VersionShare(version="1", bps=10_000)]
        request = admin.SetSplitRequest(model="identity_fp32", split=split, reason="tls test")
        assert ops.SetSplit(request, timeout=10).entry.who == f"cert:{CLIENT_NAME}"
        [entry] = ops.History(admin.HistoryRequest(model="identity_fp32"), timeout=10).entries
        assert (entry.who, entry.why) == (f"cert:{CLIENT_NAME}", "tls test")
        with pytest.raises(grpc.RpcError) as error:  # operator, not admin
            ops.ListTokens(admin.ListTokensRequest(), timeout=10)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"caller 'cert:{CLIENT_NAME}' has role 'operator'" in error.value.details()


def test_mtls_refuses_plaintext_no_certificate_and_a_foreign_certificate(mtls: GatewayProcess, pki: Pki) -> None:
    assert _refused(mtls.address, None) == grpc.StatusCode.UNAVAILABLE
    assert _refused(mtls.address, _credentials(pki.ca.cert)) == grpc.StatusCode.UNAVAILABLE
    assert _refused(mtls.address, _credentials(pki.ca.cert, pki.foreign_client)) == grpc.StatusCode.UNAVAILABLE
    # ...and a client that does not trust the gateway's CA refuses the gateway.
    assert _refused(mtls.address, _credentials(pki.foreign_ca.cert, pki.client)) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(InferenceServerException):
        _infer(_triton(mtls.address, pki.ca.cert), "mtls-no-cert")
    assert LogReader(mtls.state_dir / "log").get("mtls-no-cert") == []  # refused before any request


def test_tritonclient_over_tls_without_client_certificates(small_repository: Path, pki: Pki, tmp_path: Path) -> None:
    gateway = GatewayProcess(small_repository, _tls_config(pki.server), tmp_path)
    try:
        gateway.wait_ready(credentials=_credentials(pki.ca.cert))
        assert "(TLS)" in gateway.log and "plaintext on" not in gateway.log
        _infer(_triton(gateway.address, pki.ca.cert), "tls-1")
        assert [r.caller for r in LogReader(gateway.state_dir / "log").get("tls-1")] == [None]
        assert _refused(gateway.address, None) == grpc.StatusCode.UNAVAILABLE
    finally:
        assert gateway.stop() == 0, gateway.log


def _served_certificate(address: str) -> bytes:
    """The DER certificate a new connection to `address` is shown (not verified: any is fine here)."""
    host, port = address.rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _replace(target: Path, source: Path) -> None:
    """Replace `target` with `source`'s bytes in one rename, as a certificate manager would."""
    staged = target.with_suffix(".new")
    shutil.copyfile(source, staged)
    os.replace(staged, target)


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(RELOAD_INTERVAL_S / 2)
    return False


def test_a_rotated_certificate_reaches_new_connections_without_a_restart(
    small_repository: Path, pki: Pki, tmp_path: Path
) -> None:
    live = Pair(tmp_path / "server.pem", tmp_path / "server.key")
    shutil.copyfile(pki.server.cert, live.cert)
    shutil.copyfile(pki.server.key, live.key)
    new_ca = Authority.create(tmp_path, "rotated-ca")
    rotated = new_ca.issue("server-2", server=True)
    admin_port = _free_port()
    gateway = GatewayProcess(small_repository, _tls_config(live, extra=f"[admin]\nport = {admin_port}\n"), tmp_path)
    try:
        gateway.wait_ready(credentials=_credentials(pki.ca.cert))
        ports = [gateway.address, f"127.0.0.1:{admin_port}"]  # each port takes the new files on its own
        old = _served_certificate(gateway.address)
        assert old == pki.server.der() == _served_certificate(ports[1])

        # Half a rotation (the new certificate, the old key) does not load: the old pair stays served.
        _replace(live.cert, rotated.cert)
        assert _wait_for(lambda: _served_certificate(gateway.address) == old and "keeping the current" in gateway.log)
        assert "are not a PEM certificate chain and its key" in gateway.log

        _replace(live.key, rotated.key)
        for address in ports:
            assert _wait_for(lambda: _served_certificate(address) == rotated.der()), gateway.log  # noqa: B023
        assert "tls: certificate files changed" in gateway.log
        _infer(_triton(gateway.address, new_ca.cert), "rotated-1")  # verified against the new CA
        assert gateway.process.poll() is None  # the same process throughout
    finally:
        assert gateway.stop() == 0, gateway.log


def test_plaintext_off_loopback_logs_a_warning(small_repository: Path, tmp_path: Path) -> None:
    gateway = GatewayProcess(small_repository, '[server]\nhost = "0.0.0.0"\n', tmp_path)
    try:
        assert "WARNING gateway.server: plaintext on 0.0.0.0:" in gateway.log
        assert "not a loopback address: set [tls] to encrypt" in gateway.log
    finally:
        assert gateway.stop() == 0, gateway.log


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True)]
    + [("0.0.0.0", False), ("::", False), ("[::]", False), ("", False), ("10.1.2.3", False)]
    + [("gateway.internal", False)],
)
def test_which_hosts_are_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_tls_configuration_is_checked() -> None:
    assert config.load(None).tls.client_cert_role == "viewer"  # the least a certificate alone may do
    assert not config.load(None).tls.enabled
    for section, message in [
        ({"cert_file": "a.pem"}, "cert_file and key_file go together"),
        ({"client_ca_file": "ca.pem"}, "tls.client_ca_file: needs tls.cert_file"),
        ({"cert_file": "a", "key_file": "b", "client_cert_role": "root"}, "tls.client_cert_role: 'root' is not"),
        ({"cert_file": "a", "key_file": "b", "reload_interval_s": -1}, "tls.reload_interval_s: must not be"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config.from_dict({"tls": section})


def test_a_key_that_does_not_match_the_certificate_stops_startup(
    small_repository: Path, pki: Pki, tmp_path: Path
) -> None:
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(_tls_config(Pair(pki.server.cert, pki.client.key)))
    args = ["serve", "--model-repository", str(small_repository), "--port", "0", "--config", str(config_path)]
    result = subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert f"configuration error: tls: {pki.server.cert} and {pki.client.key} are not a PEM" in result.stderr


def test_the_operator_cli_connects_over_mtls(mtls: GatewayProcess, pki: Pki) -> None:
    base = [sys.executable, "-m", "gateway", "whoami", "--address", mtls.address, "--state-dir", str(mtls.state_dir)]
    tls = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    answered = subprocess.run([*base, *tls], capture_output=True, text=True, timeout=60)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.startswith("bootstrap-admin (admin)")  # the token names the caller
    plaintext = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert plaintext.returncode == 5 and "cannot reach a gateway" in plaintext.stderr
    half = subprocess.run(
        [*base, "--tls-ca", str(pki.ca.cert), "--tls-key", str(pki.client.key)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr
