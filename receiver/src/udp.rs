//! The receiver's socket: receive-only, batched through quinn-udp
//! (recvmmsg, and UDP GRO where the kernel has it, so one syscall can
//! bring in hundreds of datagrams). It never sends.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;

use anyhow::{Context, Result};
use quinn_udp::{RecvMeta, UdpSocketState, BATCH_SIZE};

/// Datagrams received in one batch: buffers plus where each datagram is.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    filled: usize,
}

impl RecvBatch {
    fn new(buf_len: usize) -> Self {
        RecvBatch {
            bufs: (0..BATCH_SIZE).map(|_| vec![0u8; buf_len]).collect(),
            meta: vec![RecvMeta::default(); BATCH_SIZE],
            filled: 0,
        }
    }

    /// A batch holding `datagrams` one per buffer, as the socket thread
    /// would hand them on (for tests of the decode thread).
    #[cfg(test)]
    pub fn from_datagrams(datagrams: &[Vec<u8>]) -> Self {
        RecvBatch {
            bufs: datagrams.to_vec(),
            meta: datagrams
                .iter()
                .map(|d| RecvMeta {
                    len: d.len(),
                    stride: d.len(),
                    ..RecvMeta::default()
                })
                .collect(),
            filled: datagrams.len(),
        }
    }

    /// Every datagram in arrival order (GRO buffers split by their stride),
    /// writable: the decoder decrypts each shard in place in the receive
    /// buffer instead of copying it out.
    pub fn datagrams_mut(&mut self) -> impl Iterator<Item = &mut [u8]> {
        self.meta[..self.filled]
            .iter()
            .zip(&mut self.bufs)
            .flat_map(|(m, b)| {
                let stride = m.stride.max(1);
                b[..m.len].chunks_mut(stride)
            })
    }
}

#[derive(Debug, Default)]
pub struct RecvStats {
    pub syscalls: AtomicU64,
    pub datagrams: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
}

pub struct LinkSocket {
    socket: std::net::UdpSocket,
    state: UdpSocketState,
    buf_len: usize,
}

impl LinkSocket {
    /// Binds `listen` and asks for `recv_buffer` bytes of socket buffer
    /// (forced past `net.core.rmem_max` when the process may), warning
    /// with the sysctl to raise when the kernel grants less.
    pub fn open(listen: SocketAddr, recv_buffer: usize, mtu: usize) -> Result<Self> {
        let socket = std::net::UdpSocket::bind(listen)
            .with_context(|| format!("link.listen: cannot bind {listen}"))?;
        let state = UdpSocketState::new((&socket).into()).context("setting up the link socket")?;
        let sock = socket2::SockRef::from(&socket);
        if let Err(e) = sock.set_recv_buffer_size(recv_buffer) {
            tracing::warn!("link.recv_buffer: could not set SO_RCVBUF to {recv_buffer}: {e}");
        }
        // Linux reports double the usable size it grants.
        let mut granted = sock.recv_buffer_size().unwrap_or(0) / 2;
        if granted < recv_buffer {
            // `net.core.rmem_max` capped it. A process with CAP_NET_ADMIN
            // (root, or a unit that grants it) may go past the cap with
            // SO_RCVBUFFORCE; any other gets EPERM and keeps what it has.
            if rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, recv_buffer).is_ok()
            {
                granted = sock.recv_buffer_size().unwrap_or(0) / 2;
                tracing::info!(
                    requested = recv_buffer,
                    granted,
                    "link.recv_buffer: set past net.core.rmem_max with SO_RCVBUFFORCE \
                     (this process has CAP_NET_ADMIN)"
                );
            }
        }
        if granted < recv_buffer {
            tracing::warn!(
                requested = recv_buffer,
                granted,
                "link.recv_buffer: the kernel capped the socket receive buffer; raise it with \
                 `sysctl -w net.core.rmem_max={recv_buffer}` or bursts may be dropped"
            );
        }
        let max_datagram = mtu.saturating_sub(28).max(1500);
        let buf_len = (max_datagram * state.gro_segments()).clamp(max_datagram, 65_535);
        Ok(LinkSocket {
            socket,
            state,
            buf_len,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Receives until `stop` is set, handing full batches to `out` and
    /// reusing the ones that come back on `free`.
    pub fn run(
        self,
        out: SyncSender<RecvBatch>,
        free: Receiver<RecvBatch>,
        pool: usize,
        stop: Arc<AtomicBool>,
        stats: Arc<RecvStats>,
    ) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let socket = tokio::net::UdpSocket::from_std(self.socket)
                .context("registering the link socket")?;
            let mut spare: Vec<RecvBatch> =
                (0..pool).map(|_| RecvBatch::new(self.buf_len)).collect();
            let beat = weir_ops::notify::watchdog().beat("weir-recv");
            while !stop.load(Ordering::Relaxed) {
                beat.touch();
                let mut batch = match spare.pop() {
                    Some(b) => b,
                    None => match free.recv() {
                        Ok(b) => b,
                        Err(_) => return Ok(()),
                    },
                };
                while let Ok(b) = free.try_recv() {
                    spare.push(b);
                }
                let ready =
                    tokio::time::timeout(std::time::Duration::from_millis(100), socket.readable())
                        .await;
                if !matches!(ready, Ok(Ok(()))) {
                    spare.push(batch);
                    continue;
                }
                let RecvBatch { bufs, meta, .. } = &mut batch;
                let mut slices: Vec<IoSliceMut<'_>> =
                    bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                let result = socket.try_io(tokio::io::Interest::READABLE, || {
                    self.state.recv((&socket).into(), &mut slices, meta)
                });
                drop(slices);
                match result {
                    Ok(n) => {
                        batch.filled = n;
                        stats.syscalls.fetch_add(1, Ordering::Relaxed);
                        let count: usize = batch.meta[..n]
                            .iter()
                            .map(|m| m.len.div_ceil(m.stride.max(1)))
                            .sum();
                        let bytes: usize = batch.meta[..n].iter().map(|m| m.len).sum();
                        stats.datagrams.fetch_add(count as u64, Ordering::Relaxed);
                        stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                        if out.send(batch).is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => spare.push(batch),
                    Err(e) => {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("receiving on the link failed: {e}");
                        spare.push(batch);
                    }
                }
            }
            Ok(())
        })
    }
}
