//! The fault in a 4xx/5xx body: each OpenStack service words it its own way.
//!
//! nova/cinder `{"itemNotFound": {"code": 404, "message": …}}`, neutron
//! `{"NeutronError": {"type": …, "message": …}}`, keystone `{"error": {"code", "title",
//! "message"}}`, placement (and the API-SIG format) `{"errors": [{"title", "detail", …}]}`.

use serde_json::Value;

/// Longest fault message kept.
const MAX_MESSAGE: usize = 512;

pub use crate::contract::Fault;

fn text(v: Option<&Value>) -> Option<String> {
    let s = v?.as_str()?.trim();
    if s.is_empty() {
        return None;
    }
    let mut end = s.len().min(MAX_MESSAGE);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Some(s[..end].to_string())
}

/// Reads the fault from the start of an error body (None: not JSON, cut short, or not
/// a shape we know).
pub fn parse(body: &[u8]) -> Option<Fault> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object()?;
    if let Some(errors) = obj.get("errors").and_then(Value::as_array) {
        let e = errors.first()?;
        return Some(Fault {
            kind: text(e.get("code"))
                .filter(|c| c != "placement.undefined_code")
                .or_else(|| text(e.get("title"))),
            message: text(e.get("detail")).or_else(|| text(e.get("title"))),
        });
    }
    if let Some(e) = obj.get("NeutronError").and_then(Value::as_object) {
        return Some(Fault {
            kind: text(e.get("type")),
            message: text(e.get("message")),
        });
    }
    if obj.len() != 1 {
        return None;
    }
    let (key, inner) = obj.iter().next()?;
    let inner = inner.as_object()?;
    let kind = if key == "error" {
        text(inner.get("title"))
    } else {
        Some(key.clone())
    };
    Some(Fault {
        kind,
        message: text(inner.get("message")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(body: &str) -> Option<(Option<String>, Option<String>)> {
        parse(body.as_bytes()).map(|f| (f.kind, f.message))
    }

    #[test]
    fn faults_of_each_service() {
        let s = |x: &str| Some(x.to_string());
        assert_eq!(
            f(r#"{"badRequest": {"code": 400, "message": "Invalid flavor"}}"#),
            Some((s("badRequest"), s("Invalid flavor")))
        );
        assert_eq!(
            f(
                r#"{"NeutronError": {"type": "PortBindingFailed", "message": "Binding failed", "detail": ""}}"#
            ),
            Some((s("PortBindingFailed"), s("Binding failed")))
        );
        assert_eq!(
            f(
                r#"{"error": {"code": 401, "title": "Unauthorized", "message": "The request you have made requires authentication."}}"#
            ),
            Some((
                s("Unauthorized"),
                s("The request you have made requires authentication.")
            ))
        );
        assert_eq!(
            f(
                r#"{"errors": [{"status": 500, "title": "Internal Server Error", "detail": "boom", "code": "placement.undefined_code"}]}"#
            ),
            Some((s("Internal Server Error"), s("boom")))
        );
        assert_eq!(f("<html>404</html>"), None);
        assert_eq!(f(r#"{"badRequest": {"code": 400, "mess"#), None);
    }
}
