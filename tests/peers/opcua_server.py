#!/usr/bin/env python3
"""An OPC UA server for weir's opcua test (asyncua), security None.

Usage: opcua_server.py PORT LOG_FILE

Endpoint opc.tcp://127.0.0.1:PORT/weir/, namespace 2 = "urn:weir:test".
Every 100 ms the counter n goes up by one and the variables are written
with the source timestamp of that tick:
  ns=2;s=Temp    Double   n / 4
  ns=2;i=1001    Int32    n
  ns=2;s=Flag    Boolean  n is odd
  ns=2;s=Label   String   "n=%06d" % n
  ns=2;s=Faulty  Double   n, status Good; but BadSensorFailure while
                          (n // 10) is odd (one second bad, one good)
Each tick appends {"n", "ts_ns", "faulty_bad"} to LOG_FILE (one JSON line,
flushed) after the writes, so a test knows what every value was and when.
Prints "ready" on stdout once it listens.
"""

import asyncio
import datetime
import json
import sys

from asyncua import Server, ua

PERIOD = 0.1


async def main():
    port, log_path = int(sys.argv[1]), sys.argv[2]
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/weir/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
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
