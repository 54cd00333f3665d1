//! The PROXY protocol (v1 text and v2 binary headers), which HAProxy
//! (`send-proxy`, `send-proxy-v2`) and cloud TCP load balancers put in front
//! of the client's bytes so the server learns the real client address.
//!
//! With `--proxy-protocol` every connection must start with a header; the
//! address in it (not the load balancer's) drives logs, `--max-connections-per-ip`
//! and the failed-AUTH limit. Without the flag no header is accepted: a client
//! that sends one gets BAD_MAGIC, so it cannot spoof its address.
//!
//! [`parse`] is pure (bytes in, result out); [`read_header`] reads exactly as
//! far as the parser needs and hands back any client bytes read past the
//! header in a [`Prefixed`] stream.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// The v1 header starts with these bytes.
pub const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest v1 header, CRLF included (the spec's bound).
pub const V1_MAX_LEN: usize = 107;
/// Fixed part of a v2 header: signature, version/command, family, length.
pub const V2_FIXED_LEN: usize = 16;
/// Longest v2 header accepted, TLVs included. Balancers send a few hundred
/// bytes at most; the format allows 64 KiB, which a connection would
/// otherwise make the server buffer before anything is checked.
pub const V2_MAX_LEN: usize = 2048;

/// A connection whose PROXY header cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY v1 header: {0}")]
    BadV1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    BadV2(&'static str),
    #[error("connection closed inside the PROXY header")]
    Closed,
    #[error("reading the PROXY header: {0}")]
    Io(String),
}

/// What [`parse`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A header may be there; more bytes are needed.
    Incomplete,
    /// A whole header of `len` bytes. `source` is the client's address, or
    /// `None` for a LOCAL/UNKNOWN header (a health check from the balancer
    /// itself): then the socket's peer address stands.
    Header { len: usize, source: Option<SocketAddr> },
}

/// Parses a PROXY v1 or v2 header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let v2_seen = buf.len().min(V2_SIGNATURE.len());
    if buf[..v2_seen] == V2_SIGNATURE[..v2_seen] && !buf.is_empty() {
        return parse_v2(buf);
    }
    let v1_seen = buf.len().min(V1_PREFIX.len());
    if buf[..v1_seen] == V1_PREFIX[..v1_seen] {
        return parse_v1(buf);
    }
    Err(ProxyError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX_LEN {
            return Err(ProxyError::BadV1("no CRLF within 107 bytes"));
        }
        return Ok(Parsed::Incomplete);
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::BadV1("not ASCII"))?;
    let mut parts = line.split(' ');
    parts.next(); // "PROXY", checked by the caller.
    let source = match parts.next() {
        Some("UNKNOWN") => None,
        Some(family @ ("TCP4" | "TCP6")) => {
            let fields: Vec<&str> = parts.collect();
            let [src, _dst, sport, _dport] = fields[..] else {
                return Err(ProxyError::BadV1("expected 4 address fields"));
            };
            let ip: IpAddr = src.parse().map_err(|_| ProxyError::BadV1("bad source address"))?;
            if ip.is_ipv4() != (family == "TCP4") {
                return Err(ProxyError::BadV1("address does not match the family"));
            }
            let port: u16 = sport.parse().map_err(|_| ProxyError::BadV1("bad source port"))?;
            Some(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError::BadV1("unknown protocol family")),
    };
    Ok(Parsed::Header { len: end + 2, source })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < V2_FIXED_LEN {
        return Ok(Parsed::Incomplete);
    }
    let version_command = buf[12];
    if version_command >> 4 != 0x2 {
        return Err(ProxyError::BadV2("version is not 2"));
    }
    let family = buf[13];
    let len = V2_FIXED_LEN + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX_LEN {
        return Err(ProxyError::BadV2("header longer than 2048 bytes"));
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let addresses = &buf[V2_FIXED_LEN..len];
    let source = match (version_command & 0x0F, family) {
        // LOCAL: the balancer's own connection (health check).
        (0x0, _) => None,
        // PROXY over TCP/IPv4: src(4) dst(4) sport(2) dport(2).
        (0x1, 0x11) => {
            let a = addresses.get(..12).ok_or(ProxyError::BadV2("short IPv4 block"))?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
        }
        // PROXY over TCP/IPv6: src(16) dst(16) sport(2) dport(2).
        (0x1, 0x21) => {
            let a = addresses.get(..36).ok_or(ProxyError::BadV2("short IPv6 block"))?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a[..16]);
            let ip = Ipv6Addr::from(octets);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[32], a[33]])))
        }
        // UNSPEC, UDP or unix sockets: keep the socket's address.
        (0x1, _) => None,
        _ => return Err(ProxyError::BadV2("unknown command")),
    };
    Ok(Parsed::Header { len, source })
}

/// A network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`) or a single
/// address, as `--proxy-trusted` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// True when `ip` is inside this network. IPv4-mapped IPv6 addresses
    /// (an IPv4 peer on a dual-stack listener) count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s.trim(), None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR network"))?;
        let net = net.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { net, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// Reads a PROXY header from the start of `stream`. Returns the client's
/// address (if the header names one) and the stream with any bytes read past
/// the header put back in front. The caller bounds the time this may take.
pub async fn read_header<S: AsyncRead + Unpin>(
    mut stream: S,
) -> Result<(Option<SocketAddr>, Prefixed<S>), ProxyError> {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        if let Parsed::Header { len, source } = parse(&buf)? {
            buf.advance(len);
            return Ok((source, Prefixed::new(buf.freeze(), stream)));
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) => return Err(ProxyError::Closed),
            Ok(_) => {}
            Err(e) => return Err(ProxyError::Io(e.to_string())),
        }
    }
}

/// A stream that yields `prefix` before reading `inner`; writes go straight
/// to `inner` (vectored writes included).
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.extend_from_slice(&[0x20 | command, family]);
        out.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        out.extend_from_slice(addresses);
        out
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 7000\r\nTK";
        assert_eq!(
            parse(h),
            Ok(Parsed::Header {
                len: h.len() - 2,
                source: Some("192.0.2.7:51234".parse().unwrap())
            })
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 7000\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Header {
                len: h.len(),
                source: Some("[2001:db8::1]:4000".parse().unwrap())
            })
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Parsed::Header {
                len: 15,
                source: None
            })
        );
    }

    #[test]
    fn v1_rejects_garbage_and_waits_for_more() {
        assert_eq!(parse(b"PROX"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b""), Ok(Parsed::Incomplete));
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
            Err(ProxyError::BadV1(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 ::1 ::1 1 2\r\n"),
            Err(ProxyError::BadV1(_))
        ));
        assert!(matches!(
            parse(b"PROXY UDP4 a b c d\r\n"),
            Err(ProxyError::BadV1(_))
        ));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(parse(&long), Err(ProxyError::BadV1(_))));
        assert_eq!(parse(b"TK\x01\x01"), Err(ProxyError::Missing));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::Missing));
    }

    #[test]
    fn v2_ipv4_ipv6_local_and_tlvs() {
        let ipv4 = [
            127, 0, 0, 2, 127, 0, 0, 1, 0xC3, 0x50, 0x1B, 0x58, /* TLV */ 0x04, 0, 1, 0,
        ];
        let h = v2(1, 0x11, &ipv4);
        assert_eq!(
            parse(&h),
            Ok(Parsed::Header {
                len: h.len(),
                source: Some("127.0.0.2:50000".parse().unwrap())
            })
        );
        let mut ipv6 = [0u8; 36];
        ipv6[15] = 1;
        ipv6[32..34].copy_from_slice(&443u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &ipv6)),
            Ok(Parsed::Header {
                len: 16 + 36,
                source: Some("[::1]:443".parse().unwrap())
            })
        );
        assert_eq!(
            parse(&v2(0, 0x00, &[])),
            Ok(Parsed::Header {
                len: 16,
                source: None
            })
        );
        assert_eq!(parse(&h[..20]), Ok(Parsed::Incomplete));
        assert_eq!(parse(&h[..5]), Ok(Parsed::Incomplete));
        assert!(matches!(
            parse(&v2(1, 0x11, &[1, 2, 3])),
            Err(ProxyError::BadV2(_))
        ));
        let mut bad_version = h.clone();
        bad_version[12] = 0x11;
        assert!(matches!(parse(&bad_version), Err(ProxyError::BadV2(_))));
    }

    #[tokio::test]
    async fn read_header_puts_back_the_bytes_after_the_header() {
        let mut input = v2(1, 0x11, &[10, 1, 2, 3, 10, 0, 0, 1, 0, 80, 0, 81]);
        input.extend_from_slice(b"TK\x01rest");
        // Delivered in awkward pieces.
        let mut mock = tokio_test::io::Builder::new();
        for chunk in input.chunks(5) {
            mock.read(chunk);
        }
        let (source, mut stream) = read_header(mock.build()).await.unwrap();
        assert_eq!(source, Some("10.1.2.3:80".parse().unwrap()));
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"TK\x01rest");
    }

    #[tokio::test]
    async fn read_header_fails_on_close_inside_the_header() {
        let stream = tokio_test::io::Builder::new().read(b"PROXY TCP4 1.2").build();
        assert_eq!(read_header(stream).await.unwrap_err(), ProxyError::Closed);
    }

    #[test]
    fn cidrs_parse_and_match_their_networks() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.1".parse().unwrap()), "v4-mapped");
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("2001:db8::1".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nonsense", "10.0.0.0/x", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn an_oversized_v2_header_is_refused_before_it_is_buffered() {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&header), Err(ProxyError::BadV2(_))));
    }
}
