//! The egress guard: tenant-configured URLs must not reach the node's own network. Requests to
//! loopback, private, link-local (cloud metadata included), carrier-grade NAT, multicast and
//! reserved addresses are refused, whether the URL names the address or a host name resolves
//! to it: the HTTP client resolves names through [`GuardedResolver`], which drops such
//! addresses, and never follows redirects or uses a proxy. Operators open exceptions with
//! `notify.egress_allow` / `SIGNALOPS_EGRESS_ALLOW` (host names and CIDRs).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// Hosts and networks that are reachable even though they are private.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    hosts: HashSet<String>,
    nets: Vec<IpNet>,
}

impl EgressPolicy {
    /// Parses comma-separated entries: CIDRs (`10.0.0.0/8`), addresses (`127.0.0.1`) or host
    /// names (`hooks.internal`).
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<EgressPolicy, String> {
        let mut policy = EgressPolicy::default();
        for raw in entries.into_iter().flat_map(|e| e.split(',')) {
            let entry = raw.trim();
            if entry.is_empty() {
                continue;
            }
            if let Ok(net) = entry.parse::<IpNet>() {
                policy.nets.push(net);
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                policy.nets.push(IpNet::from(ip));
            } else if entry.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
                policy.hosts.insert(entry.trim_end_matches('.').to_ascii_lowercase());
            } else {
                return Err(format!("egress_allow entry `{entry}` is neither a CIDR, an address nor a host name"));
            }
        }
        Ok(policy)
    }

    fn host_allowed(&self, host: &str) -> bool {
        self.hosts.contains(&host.trim_end_matches('.').to_ascii_lowercase())
    }

    /// True when a request may go to this address.
    pub fn ip_allowed(&self, ip: IpAddr) -> bool {
        !is_internal(ip) || self.nets.iter().any(|n| n.contains(&ip))
    }

    /// True when the operator opened this host (by name or address) explicitly: a private
    /// deployment, where plain HTTP may carry a channel's secret headers.
    pub fn explicitly_allowed(&self, url: &reqwest::Url) -> bool {
        match url.host() {
            Some(url::Host::Domain(name)) => self.host_allowed(name),
            Some(url::Host::Ipv4(ip)) => self.nets.iter().any(|n| n.contains(&IpAddr::V4(ip))),
            Some(url::Host::Ipv6(ip)) => self.nets.iter().any(|n| n.contains(&IpAddr::V6(ip))),
            None => false,
        }
    }

    /// Checks a URL before it is requested: scheme, and the host when it is an address or a
    /// name that never resolves publicly. Names are checked again, per address, at resolution.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("scheme `{}` is not allowed; use http or https", url.scheme()));
        }
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => {
                let lower = name.trim_end_matches('.').to_ascii_lowercase();
                let local = lower == "localhost" || lower.ends_with(".localhost");
                if local && !self.host_allowed(&lower) {
                    Err(format!("egress to `{name}` is refused: it is the node itself"))
                } else {
                    Ok(())
                }
            }
            None => Err("the URL has no host".into()),
        }
    }

    fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        if self.ip_allowed(ip) {
            Ok(())
        } else {
            Err(format!("egress to {ip} is refused: loopback, private, link-local and reserved addresses are not reachable (see notify.egress_allow)"))
        }
    }
}

/// Addresses a tenant's URL must not reach by default.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal_v4(v4);
            }
            let s = v6.segments();
            // ::/96 holds the unspecified and loopback addresses and the deprecated
            // IPv4-compatible form (::a.b.c.d), which some stacks still route to IPv4.
            s[..6] == [0; 6]
                || v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local (fc00::/7)
                || (s[0] & 0xffc0) == 0xfe80 // link-local (fe80::/10)
                || (s[0] & 0xffc0) == 0xfec0 // site-local (fec0::/10)
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 (64:ff9b::/96, 64:ff9b:1::/48) reaches IPv4
                || (s[..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0) // IPv4-translated ::ffff:0:a.b.c.d
                || (s[0] == 0x2001 && s[1] == 0) // Teredo (2001::/32) embeds IPv4
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x2002) // 6to4 embeds arbitrary IPv4
        }
    }
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local() // 169.254.0.0/16, cloud metadata
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0 // 0.0.0.0/8
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // carrier-grade NAT 100.64.0.0/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18.0.0/15
        || o[0] >= 240 // reserved
}

/// Resolves host names for the outbound HTTP client, keeping only addresses the policy allows.
pub struct GuardedResolver {
    pub policy: Arc<EgressPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed_host = policy.host_allowed(&host);
            let kept: Vec<SocketAddr> =
                addrs.iter().copied().filter(|a| allowed_host || policy.ip_allowed(a.ip())).collect();
            if kept.is_empty() {
                let err: Box<dyn std::error::Error + Send + Sync> = if addrs.is_empty() {
                    format!("`{host}` does not resolve").into()
                } else {
                    format!("egress to `{host}` is refused: it resolves only to loopback, private, link-local or reserved addresses (see notify.egress_allow)").into()
                };
                return Err(err);
            }
            let iter: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(iter)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).unwrap()
    }

    #[test]
    fn internal_addresses_are_refused_by_default() {
        let p = EgressPolicy::default();
        for u in [
            "http://127.0.0.1/",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[::1]/",
            "http://[fd00:ec2::254]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[64:ff9b:1::a9fe:a9fe]/",
            "http://[::ffff:0:a9fe:a9fe]/",
            "http://localhost:8080/",
            "http://api.localhost/",
            "file:///etc/passwd",
        ] {
            assert!(p.check_url(&url(u)).is_err(), "{u} passed");
        }
        for u in ["https://93.184.216.34/", "https://example.com/hook", "http://[2606:4700::1111]/"] {
            assert!(p.check_url(&url(u)).is_ok(), "{u} refused");
        }
    }

    #[test]
    fn the_allowlist_opens_cidrs_and_hosts() {
        let p = EgressPolicy::parse(["127.0.0.1/32, 10.0.0.0/8", "localhost"]).unwrap();
        assert!(p.check_url(&url("http://127.0.0.1:9000/")).is_ok());
        assert!(p.check_url(&url("http://10.9.9.9/")).is_ok());
        assert!(p.check_url(&url("http://localhost/")).is_ok());
        assert!(p.check_url(&url("http://127.0.0.2/")).is_err());
        assert!(p.check_url(&url("http://169.254.169.254/")).is_err());
        assert!(EgressPolicy::parse(["not a host!"]).is_err());
    }

    #[tokio::test]
    async fn resolution_drops_internal_addresses() {
        use reqwest::dns::Resolve;
        let name = |s: &str| s.parse::<reqwest::dns::Name>().unwrap();
        let closed = GuardedResolver { policy: Arc::new(EgressPolicy::default()) };
        let err = closed.resolve(name("localhost")).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("refused"), "{err}");
        let open = GuardedResolver { policy: Arc::new(EgressPolicy::parse(["127.0.0.0/8"]).unwrap()) };
        let addrs: Vec<_> = open.resolve(name("localhost")).await.map_err(|e| e.to_string()).unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
