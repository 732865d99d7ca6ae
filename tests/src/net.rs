//! UDP socket setup shared by the link simulator and the UDP blaster.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};

use anyhow::{Context, Result};
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;

/// Largest UDP payload of one IPv4 packet. A GSO send carries at most this
/// much in total (and at most 64 segments, the kernel's UDP_MAX_SEGMENTS).
pub const MAX_GSO_PAYLOAD: usize = 65_507;

/// Socket buffer size the tools ask for. Large, so that a receiver that is
/// briefly descheduled (2 shared cores) does not drop: 64 MiB holds ~45k
/// full-size datagrams, tens of milliseconds at 10 Gbit/s.
pub const WANTED_SOCKET_BUFFER: usize = 64 * 1024 * 1024;

/// Which way a socket carries data, so only the buffer that matters is
/// enlarged and warned about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Receive,
    Send,
}

/// What the kernel granted for one socket's buffers.
#[derive(Debug, Clone, Copy)]
pub struct BufferSizes {
    pub recv: usize,
    pub send: usize,
}

impl BufferSizes {
    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({"so_rcvbuf": self.recv, "so_sndbuf": self.send})
    }
}

fn read_sysctl(name: &str) -> String {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unreadable ({e})"))
}

/// Creates a UDP socket bound to `bind` with its receive or send buffer set
/// to `wanted` bytes, and warns on stderr (naming the sysctl to raise) if
/// the kernel capped it. `label` names the socket in the warning.
pub fn bind_udp(
    bind: SocketAddr,
    direction: Direction,
    wanted: usize,
    label: &str,
) -> Result<(UdpSocket, BufferSizes)> {
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))
        .with_context(|| format!("creating the {label} UDP socket"))?;
    // Failures here are not fatal: the kernel silently caps oversized
    // requests, and we report the size we actually got below.
    let _ = match direction {
        Direction::Receive => socket.set_recv_buffer_size(wanted),
        Direction::Send => socket.set_send_buffer_size(wanted),
    };
    socket.bind(&bind.into()).with_context(|| {
        format!("binding the {label} UDP socket to {bind} (in use? wrong address?)")
    })?;
    // Linux doubles the requested value for bookkeeping overhead, so a
    // granted request reads back as >= wanted.
    let sizes = BufferSizes {
        recv: socket.recv_buffer_size().context("reading SO_RCVBUF")?,
        send: socket.send_buffer_size().context("reading SO_SNDBUF")?,
    };
    if direction == Direction::Receive && sizes.recv < wanted {
        eprintln!(
            "warning: {label} socket: asked for SO_RCVBUF {wanted} bytes, it reads back {} \
             (Linux reports twice what it granted; capped by net.core.rmem_max = {}); \
             raise it with `sysctl -w net.core.rmem_max={wanted}` to avoid drops when this \
             process is descheduled",
            sizes.recv,
            read_sysctl("net.core.rmem_max"),
        );
    }
    if direction == Direction::Send && sizes.send < wanted {
        eprintln!(
            "warning: {label} socket: asked for SO_SNDBUF {wanted} bytes, it reads back {} \
             (Linux reports twice what it granted; capped by net.core.wmem_max = {}); \
             raise it with `sysctl -w net.core.wmem_max={wanted}`",
            sizes.send,
            read_sysctl("net.core.wmem_max"),
        );
    }
    Ok((socket.into(), sizes))
}

/// The unspecified address ("0.0.0.0:0" or "[::]:0") of `peer`'s family,
/// for a socket that only sends to `peer`.
pub fn any_port_for(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

/// A UDP socket driven through quinn-udp, so that sends can use GSO (many
/// datagrams per sendmsg) and receives use GRO and recvmmsg where the
/// kernel has them. quinn-udp makes the socket non-blocking; readiness
/// comes from the current tokio runtime.
pub struct BatchSocket {
    pub socket: tokio::net::UdpSocket,
    pub state: UdpSocketState,
    pub buffers: BufferSizes,
}

impl BatchSocket {
    /// Binds like [`bind_udp`]; must be called inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        direction: Direction,
        wanted: usize,
        label: &str,
    ) -> Result<Self> {
        let (std_socket, buffers) = bind_udp(addr, direction, wanted, label)?;
        let state = UdpSocketState::new((&std_socket).into())
            .with_context(|| format!("setting up quinn-udp on the {label} socket"))?;
        let socket = tokio::net::UdpSocket::from_std(std_socket)
            .with_context(|| format!("registering the {label} socket with tokio"))?;
        Ok(Self {
            socket,
            state,
            buffers,
        })
    }

    /// Datagrams of `segment_size` that one GSO send may carry.
    pub fn gso_segments_for(&self, segment_size: usize) -> usize {
        self.state
            .max_gso_segments()
            .min(MAX_GSO_PAYLOAD / segment_size.max(1))
            .max(1)
    }

    /// Sends one transmit, waiting while the send buffer is full. Errors
    /// other than "would block" are returned, not hidden.
    pub async fn send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        loop {
            self.socket.writable().await?;
            match self.socket.try_io(Interest::WRITABLE, || {
                self.state.try_send((&self.socket).into(), transmit)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    /// Receives a batch, waiting until at least one datagram is there.
    /// Returns how many of `metas` were filled; cancel-safe.
    pub async fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        metas: &mut [RecvMeta],
    ) -> io::Result<usize> {
        loop {
            self.socket.readable().await?;
            match self.socket.try_io(Interest::READABLE, || {
                self.state.recv((&self.socket).into(), bufs, metas)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

/// Consecutive outgoing datagrams packed for one GSO send: all the same
/// length except possibly the last, which may be shorter. Sending them in
/// one sendmsg delivers them in this order.
#[derive(Default)]
pub struct GsoBatch {
    buf: Vec<u8>,
    segment: usize,
    count: usize,
    /// A shorter (or empty) datagram ended the batch.
    closed: bool,
}

impl GsoBatch {
    /// Whether `datagram` can join this batch without breaking GSO's rules
    /// (an empty batch takes anything).
    pub fn fits(&self, datagram: &[u8], max_segments: usize) -> bool {
        self.count == 0
            || (!self.closed
                && !datagram.is_empty()
                && datagram.len() <= self.segment
                && self.count < max_segments
                && self.buf.len() + datagram.len() <= MAX_GSO_PAYLOAD)
    }

    /// Appends `datagram`; the caller checked [`Self::fits`].
    pub fn push(&mut self, datagram: &[u8]) {
        if self.count == 0 {
            self.segment = datagram.len();
        }
        debug_assert!(self.count == 0 || (!self.closed && datagram.len() <= self.segment));
        self.buf.extend_from_slice(datagram);
        self.count += 1;
        self.closed = datagram.len() < self.segment || datagram.is_empty();
    }

    /// Datagrams in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The batch's datagrams one by one (for resending without GSO).
    pub fn datagrams(&self) -> impl Iterator<Item = &[u8]> {
        // An empty datagram is only ever alone in a batch.
        let segment = self.segment.max(1);
        let empty: &[u8] = &[];
        let lone_empty = (self.count == 1 && self.buf.is_empty()).then_some(empty);
        self.buf.chunks(segment).chain(lone_empty)
    }

    /// One transmit carrying the whole batch to `destination`.
    pub fn transmit(&self, destination: SocketAddr) -> Transmit<'_> {
        Transmit {
            destination,
            ecn: None,
            contents: &self.buf,
            segment_size: (self.count > 1).then_some(self.segment),
            src_ip: None,
        }
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.count = 0;
        self.closed = false;
    }
}

/// Number of datagrams in one received buffer (more than one when GRO
/// coalesced them: all `stride` bytes long except possibly the last).
pub fn datagrams_in(meta: &RecvMeta) -> usize {
    if meta.stride == 0 {
        1
    } else {
        meta.len.div_ceil(meta.stride).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_socket_binds_and_reports_buffers() {
        let (sock, sizes) = bind_udp(
            "127.0.0.1:0".parse().unwrap(),
            Direction::Receive,
            1 << 20,
            "test",
        )
        .unwrap();
        assert!(sock.local_addr().unwrap().port() != 0);
        assert!(sizes.recv > 0 && sizes.send > 0);
    }

    /// Packs `sizes` greedily like the link simulator does; returns the
    /// batches as lists of sizes.
    fn pack(sizes: &[usize], max_segments: usize) -> Vec<Vec<usize>> {
        let mut batch = GsoBatch::default();
        let mut batches = Vec::new();
        let mut flush = |b: &mut GsoBatch| {
            if !b.is_empty() {
                batches.push(b.datagrams().map(|d| d.len()).collect::<Vec<_>>());
                b.clear();
            }
        };
        for &n in sizes {
            let d = vec![0u8; n];
            if !batch.fits(&d, max_segments) {
                flush(&mut batch);
            }
            batch.push(&d);
        }
        flush(&mut batch);
        batches
    }

    #[test]
    fn gso_batches_hold_equal_sizes_then_one_shorter() {
        assert_eq!(
            pack(&[100, 100, 100, 50, 100, 200, 200], 64),
            vec![vec![100, 100, 100, 50], vec![100], vec![200, 200]]
        );
        assert_eq!(
            pack(&[10; 5], 2),
            vec![vec![10, 10], vec![10, 10], vec![10]]
        );
        // Empty datagrams cannot be GSO segments, so each goes alone.
        assert_eq!(
            pack(&[0, 0, 5, 0], 64),
            vec![vec![0], vec![0], vec![5], vec![0]]
        );
        // 44 full-size datagrams fill one 65507-byte GSO payload.
        let packed = pack(&[1472; 100], 64);
        assert_eq!(
            packed.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![44, 44, 12]
        );
    }

    #[test]
    fn gso_batch_transmit_keeps_bytes_in_order() {
        let mut batch = GsoBatch::default();
        for i in 0..3u8 {
            batch.push(&[i; 8]);
        }
        batch.push(&[9; 3]);
        let t = batch.transmit("127.0.0.1:9".parse().unwrap());
        assert_eq!(t.segment_size, Some(8));
        assert_eq!(t.contents.len(), 27);
        assert_eq!(&t.contents[8..16], &[1; 8]);
        assert_eq!(batch.datagrams().last(), Some(&[9u8; 3][..]));
    }

    #[test]
    fn batch_socket_round_trips_a_gso_send() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let rx = BatchSocket::bind(local, Direction::Receive, 1 << 20, "rx").unwrap();
            let tx = BatchSocket::bind(local, Direction::Send, 1 << 20, "tx").unwrap();
            let segs = tx.gso_segments_for(1000).min(5);
            // `segs` datagrams of 1000 bytes and a short last one.
            let payload: Vec<u8> = (0..segs * 1000 + 10).map(|i| (i / 1000) as u8).collect();
            let transmit = Transmit {
                destination: rx.socket.local_addr().unwrap(),
                ecn: None,
                contents: &payload,
                segment_size: Some(1000),
                src_ip: None,
            };
            tx.send(&transmit).await.unwrap();
            let mut storage = vec![vec![0u8; 65536]; quinn_udp::BATCH_SIZE];
            let mut slices: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut metas = vec![RecvMeta::default(); quinn_udp::BATCH_SIZE];
            let (mut bytes, mut datagrams) = (0, 0);
            while datagrams < segs + 1 {
                let n = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    rx.recv(&mut slices, &mut metas),
                )
                .await
                .unwrap()
                .unwrap();
                for m in &metas[..n] {
                    bytes += m.len;
                    datagrams += datagrams_in(m);
                }
            }
            assert_eq!((bytes, datagrams), (payload.len(), segs + 1));
        });
    }
}
