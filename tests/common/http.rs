//! The admin plane over real HTTP.

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use reqwest::StatusCode;
use serde_json::Value;

use super::eventually;

/// A client of one admin plane.
#[derive(Clone)]
pub struct Admin {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    pub http: reqwest::Client,
}

impl Admin {
    pub fn new(base: impl Into<String>) -> Self {
        Admin {
            base: base.into(),
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The REST URL of `key` in `ns`, the key percent-encoded.
    pub fn kv(&self, ns: &str, key: &str) -> String {
        self.url(&format!(
            "/v1/kv/{ns}/{}",
            utf8_percent_encode(key, NON_ALPHANUMERIC)
        ))
    }

    /// GET `path`; panics when no answer comes.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// GET of `key` in `ns` over REST; panics when no answer comes.
    pub async fn get_kv(&self, ns: &str, key: &str) -> reqwest::Response {
        self.http
            .get(self.kv(ns, key))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {ns}/{key}: {e}"))
    }

    /// PUT of `body` as `key` in `ns` over REST; panics when no answer comes.
    pub async fn put_kv(
        &self,
        ns: &str,
        key: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.http
            .put(self.kv(ns, key))
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {ns}/{key}: {e}"))
    }

    /// The status of GET `path`, None when there is no answer.
    pub async fn status(&self, path: &str) -> Option<StatusCode> {
        self.http
            .get(self.url(path))
            .send()
            .await
            .ok()
            .map(|r| r.status())
    }

    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        json_of(self.get(path).await).await
    }

    pub async fn get_text(&self, path: &str) -> String {
        self.get(path).await.text().await.expect("body")
    }

    /// Polls `/readyz` until it answers 200 or `within` passes.
    pub async fn becomes_ready(&self, within: Duration) -> bool {
        eventually(within, || async {
            self.status("/readyz").await == Some(StatusCode::OK)
        })
        .await
    }

    /// Polls `/readyz` until it answers 503 or `within` passes.
    pub async fn becomes_unready(&self, within: Duration) -> bool {
        eventually(within, || async {
            self.status("/readyz").await == Some(StatusCode::SERVICE_UNAVAILABLE)
        })
        .await
    }
}

/// The status and JSON body of a response; panics when the body is not JSON.
pub async fn json_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    (status, v)
}

/// Asserts an error response: its status and its `{"code", "message"}`
/// body. Returns the message.
pub async fn assert_error(r: reqwest::Response, status: StatusCode, code: &str) -> String {
    let (got, body) = json_of(r).await;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    let message = body["message"].as_str().expect("message").to_owned();
    assert!(!message.is_empty());
    message
}

/// The element of a JSON array whose `name` is `name`.
pub fn named<'a>(array: &'a Value, name: &str) -> &'a Value {
    array
        .as_array()
        .expect("a JSON array")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {array}"))
}
