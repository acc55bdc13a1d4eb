//! Loopback-only endpoints, source-address ranges and socket set-up.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::http::Uri;

use crate::error::BenchError;

/// A parsed target URL whose host is known to be a loopback address.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The URL as given (used for the WebSocket request line and `Host`).
    pub url: String,
    pub addr: SocketAddr,
    /// `host[:port]` as written in the URL, for the `Host` header.
    pub authority: String,
    /// Path (and query) part, `/` when empty.
    pub path: String,
}

/// Parses `url` and refuses anything that does not resolve to loopback.
///
/// `localhost` is mapped to 127.0.0.1 without consulting the resolver so that a
/// doctored hosts file cannot redirect the load elsewhere.
pub fn loopback_endpoint(url: &str, schemes: &[&str]) -> Result<Endpoint, BenchError> {
    let bad = |reason: &str| BenchError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
    let scheme = uri.scheme_str().ok_or_else(|| bad("missing scheme"))?;
    if !schemes.contains(&scheme) {
        return Err(bad(&format!("scheme must be one of {schemes:?}")));
    }
    let host = uri.host().ok_or_else(|| bad("missing host"))?;
    let ip = parse_loopback_host(host).ok_or_else(|| BenchError::NotLoopback(url.to_string()))?;
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .ok_or_else(|| bad("missing authority"))?;
    let path = match uri.path_and_query() {
        Some(pq) if !pq.as_str().is_empty() => pq.as_str().to_string(),
        _ => "/".to_string(),
    };
    Ok(Endpoint {
        url: url.to_string(),
        addr: SocketAddr::new(ip, port),
        authority,
        path,
    })
}

/// A comma-separated list of server URLs (the nodes of a cluster), each checked as by
/// [`loopback_endpoint`]. Connection `i` goes to the `i mod n`-th.
pub fn loopback_endpoints(urls: &str, schemes: &[&str]) -> Result<Vec<Endpoint>, BenchError> {
    let list = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| loopback_endpoint(u, schemes))
        .collect::<Result<Vec<_>, _>>()?;
    if list.is_empty() {
        return Err(BenchError::BadUrl {
            url: urls.to_string(),
            reason: "no URL".into(),
        });
    }
    Ok(list)
}

/// Returns the address for a loopback host name or literal, `None` otherwise.
pub fn parse_loopback_host(host: &str) -> Option<IpAddr> {
    if host.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = literal.parse().ok()?;
    let ip = ip.to_canonical();
    ip.is_loopback().then_some(ip)
}

/// Parses `127.0.1.1-127.0.1.200`, a comma-separated list, or a mix of both.
pub fn parse_source_ips(spec: &str) -> Result<Vec<IpAddr>, BenchError> {
    const MAX: u32 = 1 << 16;
    let err = |why| BenchError::BadSourceIps(spec.to_string(), why);
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|_| err("bad IPv4 address"))?;
            let b: Ipv4Addr = b.trim().parse().map_err(|_| err("bad IPv4 address"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a {
                return Err(err("range end is below its start"));
            }
            if b - a >= MAX {
                return Err(err("range longer than 65536 addresses"));
            }
            for v in a..=b {
                out.push(IpAddr::V4(Ipv4Addr::from(v)));
            }
        } else {
            let ip: IpAddr = part.parse().map_err(|_| err("bad IP address"))?;
            out.push(ip);
        }
    }
    if out.is_empty() {
        return Err(err("empty"));
    }
    if out.iter().any(|ip| !ip.is_loopback()) {
        return Err(err("every source address must be a loopback address"));
    }
    if out.len() > MAX as usize {
        return Err(err("more than 65536 addresses"));
    }
    Ok(out)
}

/// Opens a TCP connection to `dst`, optionally from `src`.
///
/// With a source address the socket sets IP_BIND_ADDRESS_NO_PORT before `bind`, so
/// the kernel picks the port at `connect` time per 4-tuple instead of reserving one of
/// the ~28k ephemeral ports per source address at `bind` time.
pub async fn connect_tcp(dst: SocketAddr, src: Option<IpAddr>) -> Result<TcpStream, BenchError> {
    let stream = match src {
        None => TcpStream::connect(dst).await?,
        Some(ip) => {
            let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
            sock.set_nonblocking(true)?;
            if ip.is_ipv4() {
                setsockopt(&sock, IpBindAddressNoPort, &true)?;
            }
            sock.bind(&SocketAddr::new(ip, 0).into())?;
            let std_stream: std::net::TcpStream = sock.into();
            TcpSocket::from_std_stream(std_stream).connect(dst).await?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Raises the soft open-files limit to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> Result<u64, BenchError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_list_names_every_node_in_order() {
        let list = loopback_endpoints(
            "ws://127.0.0.1:8000/connection/websocket, ws://127.0.0.1:8001/connection/websocket,",
            &["ws"],
        )
        .unwrap();
        let ports: Vec<u16> = list.iter().map(|e| e.addr.port()).collect();
        assert_eq!(ports, [8000, 8001]);
        assert!(loopback_endpoints(" , ", &["ws"]).is_err());
        // One bad member refuses the whole list.
        assert!(matches!(
            loopback_endpoints("ws://127.0.0.1:1/,ws://10.0.0.1:1/", &["ws"]),
            Err(BenchError::NotLoopback(_))
        ));
    }

    #[test]
    fn accepts_only_loopback_urls() {
        let ep = loopback_endpoint("ws://127.0.0.1:8000/connection/websocket", &["ws"]).unwrap();
        assert_eq!(ep.addr, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(ep.path, "/connection/websocket");
        assert!(loopback_endpoint("ws://localhost:1/", &["ws"]).is_ok());
        assert!(loopback_endpoint("ws://127.9.8.7:1/", &["ws"]).is_ok());
        assert!(loopback_endpoint("ws://[::1]:1/", &["ws"]).is_ok());
        for bad in [
            "ws://10.0.0.1:8000/",
            "ws://192.168.1.1/",
            "ws://example.com/",
            "ws://0.0.0.0:80/",
            "ws://[::]:80/",
            "ws://[::ffff:10.0.0.1]:80/",
        ] {
            assert!(
                matches!(
                    loopback_endpoint(bad, &["ws"]),
                    Err(BenchError::NotLoopback(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            loopback_endpoint("http://127.0.0.1/", &["ws"]),
            Err(BenchError::BadUrl { .. })
        ));
    }

    #[test]
    fn parses_source_ranges() {
        let v = parse_source_ips("127.0.1.1-127.0.1.200").unwrap();
        assert_eq!(v.len(), 200);
        assert_eq!(v[199], "127.0.1.200".parse::<IpAddr>().unwrap());
        let v = parse_source_ips("127.0.0.2, 127.0.0.3-127.0.0.4").unwrap();
        assert_eq!(v.len(), 3);
        assert!(parse_source_ips("10.0.0.1-10.0.0.2").is_err());
        assert!(parse_source_ips("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_source_ips("").is_err());
    }
}
