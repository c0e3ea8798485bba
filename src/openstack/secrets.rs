//! Which requests carry credentials in their bodies, and scrubbing what looks like a
//! secret out of the text an error echoes back. APIs quote what they were sent when they
//! refuse it: nova's `Invalid input for field/attribute adminPass. Value: <the password>`,
//! keystone's validation errors. stacktap never reads request bodies, but it keeps the
//! fault message of an error response, so that message is where a secret could leave.

use std::borrow::Cow;

/// What a redacted message says instead.
pub const REDACTED: &str = "[redacted: the request carried credentials]";

/// True when the fault message of an error answering this request may quote a secret the
/// request sent. Every error of authentication, user and credential management, server
/// create, key-manager secrets; of a server action (changePassword, rebuild, rescue and
/// evacuate take an admin password) only a client error: a validation error quotes its
/// input, a server error does not (its message is needed for a root cause).
pub fn redact_fault(method: &str, route: &str, status: u16) -> bool {
    let action = route.ends_with("/action");
    carries_credentials(method, route) && (!action || (400..500).contains(&status))
}

/// True when a request of this shape sends a secret in its body: authentication, user
/// and credential management, server create / rebuild / rescue / password change (an
/// admin password), key-manager secrets. Routes are templates (`/v3/users/{user_id}`).
pub fn carries_credentials(method: &str, route: &str) -> bool {
    if !matches!(method, "POST" | "PUT" | "PATCH") {
        return false;
    }
    let r = route.to_ascii_lowercase();
    let last = r.rsplit('/').next().unwrap_or("");
    // a path segment that names a secret, anywhere: auth/tokens, password, credentials…
    const WORDS: [&str; 8] = [
        "auth",
        "tokens",
        "password",
        "credential",
        "secret",
        "users",
        "os-keypairs",
        "application_credentials",
    ];
    if r.split('/')
        .any(|seg| WORDS.iter().any(|w| seg.contains(w)))
    {
        return true;
    }
    // nova: a server's create (adminPass, user_data) and its actions (changePassword,
    // rebuild, rescue, evacuate: adminPass)
    (last == "servers" && method == "POST") || (r.contains("/servers/") && last == "action")
}

/// Words after which a value is a secret.
const SECRET_KEYS: [&str; 9] = [
    "password",
    "passwd",
    "adminpass",
    "admin_pass",
    "secret",
    "token",
    "credential",
    "api_key",
    "private_key",
];

/// `text` with secret-looking values replaced by `[redacted]`: the value after a secret's
/// name (`password: x`, `adminPass. Value: x`, `"secret": "x"`), fernet tokens, JWTs and
/// other long runs of base64 with mixed case. Ids (UUIDs, 32 hex digits) are kept.
pub fn scrub(text: &str) -> Cow<'_, str> {
    // most messages name no secret, and then only a token-like word can need redacting:
    // one search of the whole text for every name, not nine of every word
    let names_any = secret_names().is_match(text);
    if !names_any
        && !text
            .split_inclusive(char::is_whitespace)
            .any(|w| token_like(bare(w)))
    {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    // words left since a secret's name, and whether the next word is its value
    let (mut recent, mut armed) = (0u8, false);
    for w in text.split_inclusive(char::is_whitespace) {
        let body = w.trim_end();
        let space = &w[body.len()..];
        let bare = bare(w);
        let names_secret = names_any && !bare.is_empty() && secret_names().is_match(bare);
        let redact = (armed && !bare.is_empty()) || token_like(bare);
        if redact {
            out.push_str("[redacted]");
            out.push_str(space);
            (changed, armed, recent) = (true, false, 0);
            continue;
        }
        // `password=hunter2`, `"password":"x"`: the value comes in the same word
        if names_secret
            && let Some(i) = body.find(['=', ':'])
            && !body[i + 1..]
                .trim_matches(|c: char| "\"' ,}".contains(c))
                .is_empty()
        {
            out.push_str(&body[..=i]);
            out.push_str("[redacted]");
            out.push_str(space);
            changed = true;
            continue;
        }
        if names_secret {
            // `password: x`, `password = x`; or later `adminPass. Value: x`
            recent = 3;
            armed = body.ends_with([':', '=']);
        } else if recent > 0
            && (body == ":"
                || body == "="
                || bare.eq_ignore_ascii_case("value") && body.ends_with(':'))
        {
            armed = true;
        } else {
            recent = recent.saturating_sub(1);
        }
        out.push_str(w);
    }
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(text)
    }
}

/// A word (with the whitespace after it) without that whitespace and the punctuation
/// around it.
fn bare(word: &str) -> &str {
    word.trim_end()
        .trim_matches(|c: char| "\"'`,.;:=()[]{}<>".contains(c))
}

/// Finds any of `SECRET_KEYS` in any ASCII case.
fn secret_names() -> &'static aho_corasick::AhoCorasick {
    static NAMES: std::sync::LazyLock<aho_corasick::AhoCorasick> = std::sync::LazyLock::new(|| {
        aho_corasick::AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(SECRET_KEYS)
            .expect("a handful of short literal names")
    });
    &NAMES
}

/// A fernet token, a JWT, or a long run of base64 with upper case, lower case and digits
/// (ids are hex or dashed UUIDs, and words are not 32 characters of mixed case).
fn token_like(w: &str) -> bool {
    // the shortest of them is 30 long; most words are a few letters
    if w.len() < 30 {
        return false;
    }
    if w.starts_with("gAAAAA") && w.len() >= 40 {
        return true;
    }
    if w.starts_with("eyJ") && w.matches('.').count() == 2 && w.len() >= 30 {
        return true;
    }
    let b64 = w
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'_' | b'-'));
    let upper = w.bytes().any(|c| c.is_ascii_uppercase());
    let lower = w.bytes().any(|c| c.is_ascii_lowercase());
    let digit = w.bytes().any(|c| c.is_ascii_digit());
    b64 && w.len() >= 32 && upper && lower && digit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_that_send_secrets_are_known() {
        for (m, r) in [
            ("POST", "/v3/auth/tokens"),
            ("POST", "/v2.0/tokens"),
            ("POST", "/v3/users"),
            ("PATCH", "/v3/users/{user_id}"),
            ("POST", "/v3/users/{user_id}/password"),
            ("POST", "/v3/users/{user_id}/application_credentials"),
            ("POST", "/v3/credentials"),
            ("POST", "/v2.1/servers"),
            ("POST", "/v2.1/servers/{server_id}/action"),
            ("POST", "/v1/secrets"),
        ] {
            assert!(carries_credentials(m, r), "{m} {r}");
        }
        for (m, r) in [
            ("GET", "/v3/auth/tokens"),
            ("GET", "/v2.1/servers/{server_id}"),
            ("PUT", "/v2.0/ports/{port_id}"),
            ("POST", "/v2.0/networks"),
            ("DELETE", "/v3/users/{user_id}"),
        ] {
            assert!(!carries_credentials(m, r), "{m} {r}");
        }
    }

    #[test]
    fn secrets_in_messages_are_scrubbed_and_ids_kept() {
        for (text, secret) in [
            (
                "Invalid input for field/attribute adminPass. Value: hunter2hunter2. 'x' is too short",
                "hunter2hunter2",
            ),
            ("Invalid password: correct-horse", "correct-horse"),
            ("password=s3cr3t! rejected", "s3cr3t!"),
            ("{\"password\": \"p@ss\"} is not valid", "p@ss"),
            (
                "token gAAAAABsecret-token-0123456789abcdefghijklmnopqrstuv is expired",
                "gAAAAABsecret-token",
            ),
            (
                "bad key Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MEFCQ0RFRkdISUpL here",
                "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MEFCQ0RFRkdISUpL",
            ),
        ] {
            let s = scrub(text);
            assert!(!s.contains(secret), "{text:?} → {s:?}");
            assert!(s.contains("[redacted]"), "{s}");
        }
        let ids = "Instance 0d7b6b5c-9f1e-4c36-8a1c-2f4e5d6c7b8a could not be found (req-1, msg 18c3aeba5d884884a9ea818660fd1abe)";
        assert_eq!(scrub(ids), ids);
        let plain = "Binding failed for port, please check neutron logs";
        assert_eq!(scrub("The token is invalid"), "The token is invalid");
        assert!(matches!(scrub(plain), Cow::Borrowed(_)));
        // a secret's name in any case
        let shouted = scrub("PassWord: hunter2 and API_KEY=abc");
        assert!(
            !shouted.contains("hunter2") && !shouted.contains("abc"),
            "{shouted}"
        );
    }

    proptest::proptest! {
        /// The one search for every name finds a name where a search for each name in
        /// the word's lower case finds it.
        #[test]
        fn secret_names_are_found_as_each_name_in_lower_case_is(
            w in "([a-zA-Z_ ]|PassWd|SECRET|Token|admin_Pass|api_key|Credential){0,6}"
        ) {
            let lower = w.to_ascii_lowercase();
            let each = SECRET_KEYS.iter().any(|k| lower.contains(k));
            proptest::prop_assert_eq!(secret_names().is_match(&w), each);
        }
    }
}
