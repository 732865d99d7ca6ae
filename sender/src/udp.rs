//! The sender's socket: send-only, batched with UDP GSO through quinn-udp
//! (one syscall carries up to ~44 datagrams), one datagram per syscall
//! where the kernel lacks GSO. It is never read: the sender has no
//! receiving path on the link.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use anyhow::{Context, Result};
use quinn_udp::{Transmit, UdpSocketState};

pub struct LinkSocket {
    socket: UdpSocket,
    state: UdpSocketState,
    destination: SocketAddr,
}

/// Largest UDP payload one GSO send may carry (the IP length field).
const MAX_GSO_BYTES: usize = 65_000;

impl LinkSocket {
    pub fn open(
        bind: Option<SocketAddr>,
        destination: SocketAddr,
        send_buffer: usize,
    ) -> Result<Self> {
        let bind = bind.unwrap_or_else(|| {
            if destination.is_ipv4() {
                SocketAddr::from(([0, 0, 0, 0], 0))
            } else {
                SocketAddr::from(([0u16; 8], 0))
            }
        });
        let socket =
            UdpSocket::bind(bind).with_context(|| format!("link.bind: cannot bind {bind}"))?;
        let state = UdpSocketState::new((&socket).into()).context("setting up the link socket")?;
        // A dedicated thread sends, so a full send buffer should block it
        // (that is the pacing of last resort), not spin.
        socket
            .set_nonblocking(false)
            .context("making the link socket blocking")?;
        let sock = socket2::SockRef::from(&socket);
        if let Err(e) = sock.set_send_buffer_size(send_buffer) {
            tracing::warn!("link.send_buffer: could not set SO_SNDBUF to {send_buffer}: {e}");
        }
        // Nothing is ever read from this socket; keep its receive buffer minimal.
        let _ = sock.set_recv_buffer_size(1);
        Ok(LinkSocket {
            socket,
            state,
            destination,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Datagrams of `frame_len` bytes one `send` may carry.
    pub fn batch_for(&self, frame_len: usize) -> usize {
        self.state
            .max_gso_segments()
            .min(MAX_GSO_BYTES / frame_len)
            .max(1)
    }

    /// Sends `contents`, which holds datagrams of `segment` bytes each (the
    /// last may be shorter), in one syscall where GSO is available.
    pub fn send(&self, contents: &[u8], segment: usize) -> io::Result<()> {
        let segment_size = if contents.len() > segment {
            Some(segment)
        } else {
            None
        };
        let transmit = Transmit {
            destination: self.destination,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        self.state.try_send((&self.socket).into(), &transmit)
    }
}
