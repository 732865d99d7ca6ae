#!/usr/bin/env python3
"""Prints the frames in a decoder_datagrams input: one line per datagram
with its header fields, and a heartbeat's session and next_block.
Usage: python3 show_datagrams.py FILE"""
import sys, struct, zlib
def varint(b, i):
    v=0; s=0
    while True:
        x=b[i]; i+=1; v|=(x&0x7f)<<s; s+=7
        if not x&0x80: return v,i
data=open(sys.argv[1],'rb').read()
i=0; t=0
while len(data)-i>=3:
    f=data[i]; l=min(struct.unpack('>H',data[i+1:i+3])[0], len(data)-i-3)
    d=bytearray(data[i+3:i+3+l]); i+=3+l; t+=f&0x7f
    if f&0x80 and len(d)>=36:
        d[26:28]=struct.pack('>H',len(d)-36); d[-4:]=struct.pack('>I',zlib.crc32(bytes(d[:-4])))
    if len(d)<36 or d[:2]!=b'WR' or d[2]!=2 or zlib.crc32(bytes(d[:-4]))!=struct.unpack('>I',d[-4:])[0]:
        print(f"t={t}ms len={len(d)} not a frame"); continue
    fl,sess,blk,idx,k,m,sl,dl=d[3],*struct.unpack('>QQHHHHI',d[4:32])
    extra=''
    if fl&1:
        try:
            b=bytes(d[32:32+sl]); tag,j=varint(b,0); s2,j=varint(b,j); up,j=varint(b,j); nb,j=varint(b,j); extra=f" heartbeat session={s2:#x} next_block={nb}"
        except Exception as e: extra=' bad control'
    print(f"t={t}ms flags={fl} session={sess:#x} block={blk} idx={idx} k={k} m={m} shard_len={sl} data_len={dl}{extra}")
