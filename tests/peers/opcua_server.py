#!/usr/bin/env python3
"""An OPC UA server for weir's opcua test (asyncua).

Usage: opcua_server.py PORT LOG_FILE [--cert PEM --key PEM [--client-cert PEM]]
                                     [--user NAME --password PASSWORD]

Without --cert: security None only, anonymous. With --cert/--key (the
server's application instance certificate, whose first subjectAltName is
URI:urn:weir:test:server): Basic256Sha256 Sign and SignAndEncrypt only,
and with --client-cert only that client certificate is accepted. With
--user/--password: user name sessions only, that user and password, any
other refused (BadUserAccessDenied).

Endpoint opc.tcp://127.0.0.1:PORT/weir/, namespace 2 = "urn:weir:test".
Every 100 ms the counter n goes up by one and the variables are written
with the source timestamp of that tick:
  ns=2;s=Temp    Double   n / 4
  ns=2;i=1001    Int32    n
  ns=2;s=Flag    Boolean  n is odd
  ns=2;s=Label   String   "n=%06d" % n
  ns=2;s=Faulty  Double   n, status Good; but BadSensorFailure while
                          (n // 10) is odd (one second bad, one good)
  ns=2;s=Line1.Speed          Double   n * 1.5  (folder Plant/Line1; it has
                                        a property Unit, not a value)
  ns=2;s=Line1.Running        Boolean  n % 3 == 0
  ns=2;s=Line1.Motor.Current  Double   n / 10   (folder Plant/Line1/Motor)
Each tick appends {"n", "ts_ns", "faulty_bad"} to LOG_FILE (one JSON line,
flushed) after the writes, so a test knows what every value was and when.
Prints "ready" on stdout once it listens.
"""

import argparse
import asyncio
import datetime
import json

from asyncua import Server, ua
from asyncua.crypto import uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager

PERIOD = 0.1


class OneUser(UserManager):
    def __init__(self, name, password):
        self.name, self.password = name, password

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username == self.name and password == self.password:
            return User(role=UserRole.User)
        return None


async def main():
    args = argparse.ArgumentParser()
    args.add_argument("port", type=int)
    args.add_argument("log")
    args.add_argument("--cert")
    args.add_argument("--key")
    args.add_argument("--client-cert")
    args.add_argument("--user")
    args.add_argument("--password")
    a = args.parse_args()
    port, log_path = a.port, a.log
    server = Server(user_manager=OneUser(a.user, a.password) if a.user else None)
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/weir/")
    if a.cert:
        await server.set_application_uri("urn:weir:test:server")
        await server.load_certificate(a.cert)
        await server.load_private_key(a.key, format="pem")
        server.set_security_policy(
            [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt, ua.SecurityPolicyType.Basic256Sha256_Sign]
        )
        if a.client_cert:
            trusted = uacrypto.der_from_x509(await uacrypto.load_certificate(a.client_cert))

            async def only_the_client(cert, app_description):
                if uacrypto.der_from_x509(cert) != trusted:
                    raise ua.uaerrors.BadCertificateUntrusted()

            server.set_certificate_validator(only_the_client)
    else:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    if a.user:
        server.set_identity_tokens([ua.UserNameIdentityToken])
    idx = await server.register_namespace("urn:weir:test")
    assert idx == 2, idx
    plant = await server.nodes.objects.add_object(ua.NodeId("Plant", idx), "Plant")
    variables = {}
    for node, name, initial, vtype in [
        (ua.NodeId("Temp", idx), "Temp", 0.0, ua.VariantType.Double),
        (ua.NodeId(1001, idx), "Count", 0, ua.VariantType.Int32),
        (ua.NodeId("Flag", idx), "Flag", False, ua.VariantType.Boolean),
        (ua.NodeId("Label", idx), "Label", "", ua.VariantType.String),
        (ua.NodeId("Faulty", idx), "Faulty", 0.0, ua.VariantType.Double),
    ]:
        variables[name] = (await plant.add_variable(node, name, ua.Variant(initial, vtype)), vtype)
    line1 = await plant.add_folder(ua.NodeId("Line1", idx), "Line1")
    motor = await line1.add_folder(ua.NodeId("Line1.Motor", idx), "Motor")
    for parent, node, name, initial, vtype in [
        (line1, "Line1.Speed", "Speed", 0.0, ua.VariantType.Double),
        (line1, "Line1.Running", "Running", False, ua.VariantType.Boolean),
        (motor, "Line1.Motor.Current", "Current", 0.0, ua.VariantType.Double),
    ]:
        variables[node] = (await parent.add_variable(ua.NodeId(node, idx), name, ua.Variant(initial, vtype)), vtype)
    await variables["Line1.Speed"][0].add_property(ua.NodeId("Line1.Speed.Unit", idx), "Unit", "m/min")
    log = open(log_path, "a")
    async with server:
        print("ready", flush=True)
        n = 0
        start = asyncio.get_running_loop().time()
        while True:
            n += 1
            await asyncio.sleep(max(0.0, start + n * PERIOD - asyncio.get_running_loop().time()))
            now = datetime.datetime.now(datetime.timezone.utc)
            ts_ns = int(now.timestamp()) * 1_000_000_000 + now.microsecond * 1000
            faulty_bad = (n // 10) % 2 == 1
            values = {
                "Temp": n / 4,
                "Count": n,
                "Flag": n % 2 == 1,
                "Label": "n=%06d" % n,
                "Faulty": float(n),
                "Line1.Speed": n * 1.5,
                "Line1.Running": n % 3 == 0,
                "Line1.Motor.Current": n / 10,
            }
            for name, value in values.items():
                var, vtype = variables[name]
                status = ua.StatusCode(ua.StatusCodes.Good)
                if name == "Faulty" and faulty_bad:
                    status = ua.StatusCode(ua.StatusCodes.BadSensorFailure)
                await var.write_value(
                    ua.DataValue(Value=ua.Variant(value, vtype), StatusCode=status, SourceTimestamp=now, ServerTimestamp=now)
                )
            log.write(json.dumps({"n": n, "ts_ns": ts_ns, "faulty_bad": faulty_bad}) + "\n")
            log.flush()


if __name__ == "__main__":
    asyncio.run(main())
