//! The proxy: the application's backend in the loop. A session asks the backend whether a
//! client may connect, subscribe, publish, refresh, and what an RPC answers, with the
//! requests and responses of Centrifugo's HTTP proxy so a backend written for Centrifugo
//! works unchanged. What carries a request (HTTP here) is behind [`ProxyClient`]; this
//! module builds requests and reads responses.
//!
//! Every response is `{"result": …}`, `{"error": {code, message, temporary}}` (the client
//! gets that error) or `{"disconnect": {code, reason}}` (the client is closed with it). A
//! backend that cannot be reached, is slow, answers non-2xx or garbage gives the client
//! internal error 100 (temporary: the SDKs retry); the failure is logged with the endpoint
//! and counted in `herald_proxy_requests_total{proxy, result}`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use herald_protocol::json::Raw;
use herald_protocol::{Disconnect, ErrorCode, ProtocolError};
use serde::{Deserialize, Serialize};

use crate::failure::Fail;

/// One proxy endpoint: `[client.proxy.connect]`, `[channel.proxy.subscribe]`, `[rpc.proxy]`….
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyOptions {
    /// Turns this proxy on. Default: false.
    pub enabled: bool,
    /// `http://` or `https://` URL the request is POSTed to. Required when enabled.
    pub endpoint: String,
    /// How long the backend has to answer. Default: "1s".
    #[serde(with = "crate::duration")]
    pub timeout: Duration,
    /// Headers of the client's HTTP request (and the `headers` a connect command emulates)
    /// forwarded to the backend, by name (case-insensitive). Default: [].
    pub http_headers: Vec<String>,
    /// Headers added to every request to the backend (e.g. a shared secret). Default: {}.
    pub static_http_headers: BTreeMap<String, String>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: String::new(),
            timeout: Duration::from_secs(1),
            http_headers: Vec::new(),
            static_http_headers: BTreeMap::new(),
        }
    }
}

impl ProxyOptions {
    /// Checks the options; `key` names the section in the message.
    pub fn validate(&self, key: &str) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        if !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://")) {
            return Err(format!(
                "{key}.endpoint: {:?} is not an http:// or https:// URL",
                self.endpoint
            ));
        }
        if self.timeout.is_zero() {
            return Err(format!("{key}.timeout: must be above 0"));
        }
        Ok(())
    }

    /// Whether the client header `name` goes to the backend.
    pub fn forwards(&self, name: &str) -> bool {
        self.http_headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
    }
}

/// `[client.proxy]`: connection-wide proxies.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientProxies {
    /// Authorises connections that come without a token.
    pub connect: ProxyOptions,
    /// Extends connections whose expiry the connect proxy set.
    pub refresh: ProxyOptions,
}

/// `[channel.proxy]`: proxies used by namespaces that enable them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelProxies {
    /// With `subscribe_proxy_enabled`: decides subscribes.
    pub subscribe: ProxyOptions,
    /// With `publish_proxy_enabled`: decides (and may rewrite) client publications.
    pub publish: ProxyOptions,
    /// With `sub_refresh_proxy_enabled`: extends subscriptions whose expiry the subscribe
    /// proxy set.
    pub sub_refresh: ProxyOptions,
}

/// `[rpc.proxy]`: where `rpc` commands go; `routes` sends methods to their own endpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcProxy {
    /// Turns the RPC proxy on. Default: false.
    pub enabled: bool,
    /// Endpoint of methods without a route. Required when enabled.
    pub endpoint: String,
    /// How long the backend has to answer. Default: "1s".
    #[serde(with = "crate::duration")]
    pub timeout: Duration,
    /// Client headers forwarded (as in `[client.proxy.connect]`). Default: [].
    pub http_headers: Vec<String>,
    /// Headers added to every request. Default: {}.
    pub static_http_headers: BTreeMap<String, String>,
    /// Method → endpoint URL (same timeout and headers). Default: {}.
    pub routes: BTreeMap<String, String>,
}

impl Default for RpcProxy {
    fn default() -> Self {
        let d = ProxyOptions::default();
        Self {
            enabled: d.enabled,
            endpoint: d.endpoint,
            timeout: d.timeout,
            http_headers: d.http_headers,
            static_http_headers: d.static_http_headers,
            routes: BTreeMap::new(),
        }
    }
}

impl RpcProxy {
    /// The default endpoint's options.
    pub fn options(&self) -> ProxyOptions {
        ProxyOptions {
            enabled: self.enabled,
            endpoint: self.endpoint.clone(),
            timeout: self.timeout,
            http_headers: self.http_headers.clone(),
            static_http_headers: self.static_http_headers.clone(),
        }
    }

    /// The endpoint for `method`, if the RPC proxy is on.
    pub fn route(&self, method: &str) -> Option<ProxyOptions> {
        if !self.enabled {
            return None;
        }
        let mut o = self.options();
        if let Some(url) = self.routes.get(method) {
            o.endpoint = url.clone();
        }
        Some(o)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.options().validate("rpc.proxy")?;
        for (method, url) in &self.routes {
            if !self.enabled {
                return Err(format!(
                    "rpc.proxy.routes.{method}: routes need rpc.proxy.enabled"
                ));
            }
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "rpc.proxy.routes.{method}: {url:?} is not an http:// or https:// URL"
                ));
            }
        }
        Ok(())
    }
}

/// Which proxy a request is for (the `proxy` label of the metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyKind {
    Connect,
    Refresh,
    Subscribe,
    Publish,
    SubRefresh,
    Rpc,
}

impl ProxyKind {
    pub fn name(self) -> &'static str {
        match self {
            ProxyKind::Connect => "connect",
            ProxyKind::Refresh => "refresh",
            ProxyKind::Subscribe => "subscribe",
            ProxyKind::Publish => "publish",
            ProxyKind::SubRefresh => "sub_refresh",
            ProxyKind::Rpc => "rpc",
        }
    }
}

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot reach the backend: {0}")]
    Unreachable(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("bad response: {0}")]
    BadResponse(String),
    #[error("no proxy client installed")]
    NoClient,
}

impl ProxyError {
    /// The `result` label of the metric.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyError::Unreachable(_) | ProxyError::NoClient => "unreachable",
            ProxyError::Timeout(_) => "timeout",
            ProxyError::Status(_) => "bad_status",
            ProxyError::BadResponse(_) => "bad_response",
        }
    }
}

/// Carries one proxy request: POST `body` (JSON) with `headers` to `options.endpoint` within
/// `options.timeout`; the response body of a 2xx answer.
pub trait ProxyClient: Send + Sync {
    fn post<'a>(
        &'a self,
        options: &'a ProxyOptions,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Bytes, ProxyError>> + Send + 'a>>;
}

/// What every request says about the client.
#[derive(Debug, Clone, Serialize)]
pub struct ClientFields<'a> {
    pub client: &'a str,
    pub transport: &'a str,
    pub protocol: &'a str,
    pub encoding: &'a str,
}

#[derive(Debug, Serialize)]
pub struct ConnectRequest<'a> {
    #[serde(flatten)]
    pub client: ClientFields<'a>,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a Raw>,
}

#[derive(Debug, Serialize)]
pub struct RefreshRequest<'a> {
    #[serde(flatten)]
    pub client: ClientFields<'a>,
    pub user: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<&'a Raw>,
}

#[derive(Debug, Serialize)]
pub struct SubscribeRequest<'a> {
    #[serde(flatten)]
    pub client: ClientFields<'a>,
    pub user: &'a str,
    pub channel: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a Raw>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<&'a Raw>,
}

#[derive(Debug, Serialize)]
pub struct PublishRequest<'a> {
    #[serde(flatten)]
    pub client: ClientFields<'a>,
    pub user: &'a str,
    pub channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a Raw>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<&'a Raw>,
}

#[derive(Debug, Serialize)]
pub struct SubRefreshRequest<'a> {
    #[serde(flatten)]
    pub client: ClientFields<'a>,
    pub user: &'a str,
    pub channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<&'a Raw>,
}

#[derive(Debug, Serialize)]
pub struct RpcRequest<'a> {
    #[serde(flatten)]
    pub client: ClientFields<'a>,
    pub user: &'a str,
    pub method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a Raw>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<&'a Raw>,
}

/// A server-side subscription from the connect result's `subs`.
#[derive(Debug, Default, Deserialize)]
pub struct SubOptions {
    #[serde(default)]
    pub info: Option<Raw>,
    #[serde(default)]
    pub data: Option<Raw>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ConnectResult {
    #[serde(default)]
    pub user: String,
    /// Unix seconds; 0: never.
    #[serde(default)]
    pub expire_at: u64,
    #[serde(default)]
    pub info: Option<Raw>,
    #[serde(default)]
    pub b64info: Option<String>,
    #[serde(default)]
    pub data: Option<Raw>,
    #[serde(default)]
    pub b64data: Option<String>,
    #[serde(default)]
    pub channels: Vec<String>,
    #[serde(default)]
    pub subs: BTreeMap<String, SubOptions>,
    #[serde(default)]
    pub meta: Option<Raw>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RefreshResult {
    #[serde(default)]
    pub expired: bool,
    #[serde(default)]
    pub expire_at: u64,
    #[serde(default)]
    pub info: Option<Raw>,
    #[serde(default)]
    pub b64info: Option<String>,
}

/// `{"value": bool}`: an override of one namespace option for this subscription.
#[derive(Debug, Default, Deserialize, Clone, Copy)]
pub struct BoolValue {
    pub value: bool,
}

#[derive(Debug, Default, Deserialize, Clone, Copy)]
pub struct SubscribeOverride {
    #[serde(default)]
    pub presence: Option<BoolValue>,
    #[serde(default)]
    pub join_leave: Option<BoolValue>,
    #[serde(default)]
    pub force_push_join_leave: Option<BoolValue>,
    #[serde(default)]
    pub force_recovery: Option<BoolValue>,
    #[serde(default)]
    pub force_positioning: Option<BoolValue>,
}

#[derive(Debug, Default, Deserialize)]
pub struct SubscribeResult {
    #[serde(default)]
    pub info: Option<Raw>,
    #[serde(default)]
    pub b64info: Option<String>,
    #[serde(default)]
    pub data: Option<Raw>,
    #[serde(default)]
    pub b64data: Option<String>,
    #[serde(default)]
    pub expire_at: u64,
    #[serde(default)]
    pub r#override: Option<SubscribeOverride>,
}

#[derive(Debug, Default, Deserialize)]
pub struct PublishResult {
    #[serde(default)]
    pub data: Option<Raw>,
    #[serde(default)]
    pub b64data: Option<String>,
    #[serde(default)]
    pub skip_history: bool,
}

#[derive(Debug, Default, Deserialize)]
pub struct RpcResult {
    #[serde(default)]
    pub data: Option<Raw>,
    #[serde(default)]
    pub b64data: Option<String>,
}

#[derive(Debug, Deserialize)]
struct BackendError {
    code: u32,
    #[serde(default)]
    message: String,
    #[serde(default)]
    temporary: bool,
}

#[derive(Debug, Deserialize)]
struct BackendDisconnect {
    code: u16,
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Deserialize)]
struct Response<T> {
    #[serde(default = "Option::default")]
    result: Option<T>,
    #[serde(default)]
    error: Option<BackendError>,
    #[serde(default)]
    disconnect: Option<BackendDisconnect>,
}

/// How the backend answered: its result, or the error or disconnect the client gets.
pub fn read_response<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, Outcome> {
    let r: Response<T> = serde_json::from_slice(body)
        .map_err(|e| Outcome::Failed(ProxyError::BadResponse(e.to_string())))?;
    if let Some(d) = r.disconnect {
        // A code outside the application ranges would mislead the client about reconnecting.
        if !(3000..=4999).contains(&d.code) {
            return Err(Outcome::Failed(ProxyError::BadResponse(format!(
                "disconnect code {} outside 3000-4999",
                d.code
            ))));
        }
        return Err(Outcome::Disconnect(Disconnect::new(d.code, d.reason)));
    }
    if let Some(e) = r.error {
        return Err(Outcome::Error(ProtocolError {
            code: e.code,
            message: e.message,
            temporary: e.temporary,
        }));
    }
    Ok(r.result.unwrap_or_default())
}

/// A proxy call that did not give a result.
#[derive(Debug)]
pub enum Outcome {
    /// The backend's own error for the client.
    Error(ProtocolError),
    /// The backend asks to close the connection.
    Disconnect(Disconnect),
    /// No usable answer: internal error (temporary) for the client.
    Failed(ProxyError),
}

impl Outcome {
    /// The `result` label of the metric.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Error(_) => "error",
            Outcome::Disconnect(_) => "disconnect",
            Outcome::Failed(e) => e.label(),
        }
    }
}

impl From<Outcome> for Fail {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Error(e) => Fail::Error(e),
            Outcome::Disconnect(d) => Fail::Disconnect(d),
            Outcome::Failed(_) => Fail::Error(ErrorCode::INTERNAL.error()),
        }
    }
}

/// `info`/`b64info` (or `data`/`b64data`) of a result as raw JSON: base64 bytes that are
/// JSON become that JSON, others a base64 string (as Protobuf client data does).
pub fn raw_or_b64(raw: Option<Raw>, b64: Option<&str>) -> Result<Option<Raw>, Outcome> {
    if raw.is_some() {
        return Ok(raw.map(herald_protocol::json::single_line));
    }
    let Some(b64) = b64 else {
        return Ok(None);
    };
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| Outcome::Failed(ProxyError::BadResponse(format!("b64 field: {e}"))))?;
    Ok(Some(
        herald_protocol::json::from_bytes(&bytes)
            .unwrap_or_else(|| herald_protocol::json::base64_string(&bytes)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_map_to_results_errors_and_disconnects() {
        let r: ConnectResult =
            read_response(br#"{"result":{"user":"56","expire_at":10,"channels":["a"]}}"#).unwrap();
        assert_eq!((r.user.as_str(), r.expire_at), ("56", 10));
        assert_eq!(r.channels, ["a"]);
        match read_response::<ConnectResult>(br#"{"error":{"code":1000,"message":"no"}}"#) {
            Err(Outcome::Error(e)) => assert_eq!((e.code, e.message.as_str()), (1000, "no")),
            other => panic!("{other:?}"),
        }
        match read_response::<ConnectResult>(br#"{"disconnect":{"code":4501,"reason":"x"}}"#) {
            Err(Outcome::Disconnect(d)) => assert_eq!(d.code, 4501),
            other => panic!("{other:?}"),
        }
        for garbage in [
            &b"<html>"[..],
            b"{\"result\":5}",
            b"{\"disconnect\":{\"code\":1000}}",
        ] {
            assert!(
                matches!(
                    read_response::<ConnectResult>(garbage),
                    Err(Outcome::Failed(_))
                ),
                "{garbage:?}"
            );
        }
        // An empty object is an empty result (everything default).
        let r: RpcResult = read_response(b"{}").unwrap();
        assert!(r.data.is_none());
    }

    #[test]
    fn b64_fields_become_json_or_base64_strings() {
        let v = raw_or_b64(None, Some("eyJhIjoxfQ==")).unwrap().unwrap();
        assert_eq!(v.get(), r#"{"a":1}"#);
        let v = raw_or_b64(None, Some("AP8=")).unwrap().unwrap();
        assert_eq!(v.get(), r#""AP8=""#);
        assert!(raw_or_b64(None, Some("!!")).is_err());
    }

    #[test]
    fn rpc_routes() {
        let p = RpcProxy {
            enabled: true,
            endpoint: "http://a/rpc".into(),
            routes: [("year".to_string(), "http://b/year".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(p.route("year").unwrap().endpoint, "http://b/year");
        assert_eq!(p.route("other").unwrap().endpoint, "http://a/rpc");
        assert!(RpcProxy::default().route("x").is_none());
    }
}
