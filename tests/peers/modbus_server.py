#!/usr/bin/env python3
"""A Modbus TCP device for weir's modbus tests (pymodbus).

Usage: modbus_server.py PORT LOG_FILE [UNIT]

Every value derives from one counter n = the number of whole 100 ms
periods since start, written into the tables just before each read is
answered; each answered read appends {"fc", "address", "count", "n"} to
LOG_FILE (one JSON line, flushed), so a test knows exactly what every
poll was told.

Holding registers (function 3), unit UNIT (default 1):
  0       u16   n
  1..2    f32   n / 2            word order big (ABCD)
  3..4    f32   n / 2 + 0.25     word order little (CDAB)
  5       i16   -n
  6..7    i32   -1000 n          big
  8..11   f64   n / 8            big
  12..15  str   "n=%06d" % n     8 ASCII characters
  16      u16   3 n (mod 65536)  bytes swapped (byte order little)
  17..99  not mapped: a read answers exception 0x02 (illegal data address)
Input registers (function 4): 0..1 u32 100000 n (word order big).
Coils (function 1): 0 = n is odd, 1 = n is a multiple of 3.
Discrete inputs (function 2): 0 = n is even.
"""

import asyncio
import json
import struct
import sys
import time

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

PERIOD = 0.1


def words(fmt, value):
    raw = struct.pack(">" + fmt, value)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def holding(n):
    regs = [n & 0xFFFF]
    regs += words("f", n / 2)
    f = words("f", n / 2 + 0.25)
    regs += [f[1], f[0]]
    regs += words("h", -(n % 30000))
    regs += words("i", -1000 * n)
    regs += words("d", n / 8)
    text = ("n=%06d" % (n % 1000000)).encode()
    regs += [int.from_bytes(text[i : i + 2], "big") for i in range(0, 8, 2)]
    v = (3 * n) & 0xFFFF
    regs += [((v & 0xFF) << 8) | (v >> 8)]
    return regs


def main():
    port = int(sys.argv[1])
    log = open(sys.argv[2], "a", encoding="utf-8")
    unit = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    start = time.monotonic()

    async def action(fc, start_address, address, count, registers, values):
        n = int((time.monotonic() - start) / PERIOD)
        if fc == 3:
            regs = holding(n)
            registers[0 : len(regs)] = regs
        elif fc == 4:
            registers[0:2] = words("I", (100000 * n) & 0xFFFFFFFF)
        elif fc == 1:
            registers[0] = (1 if n % 2 == 1 else 0) | (2 if n % 3 == 0 else 0)
        elif fc == 2:
            registers[0] = 1 if n % 2 == 0 else 0
        log.write(json.dumps({"fc": fc, "address": address, "count": count, "n": n}) + "\n")
        log.flush()
        return None

    device = SimDevice(
        id=unit,
        simdata=(
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, count=17, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, count=2, values=0, datatype=DataType.REGISTERS)],
        ),
        action=action,
    )

    async def serve():
        server = ModbusTcpServer(device, address=("127.0.0.1", port))
        print(f"modbus server on 127.0.0.1:{port} unit {unit}", flush=True)
        await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
