//! Who is calling, from the User-Agent (oslo-wire.md §7.4).
//!
//! keystoneauth appends `keystoneauth1/<v> python-requests/<v> <impl>/<v>` to whatever
//! the caller named itself; with no name it puts `basename(argv[0])` first, which is the
//! service's process name (`nova-compute keystoneauth1/…`).

/// What a User-Agent tells about the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Agent {
    /// A service process by its argv[0] (`nova-compute`).
    Process(String),
    /// keystonemiddleware validating a token for an API service (`nova`).
    TokenMiddleware(String),
    /// An OpenStack client library or the SDK (`python-novaclient`, `openstacksdk`):
    /// used by services and users alike.
    ClientLibrary(String),
    Other,
}

/// argv[0] values that name an interpreter or a WSGI container, not a service.
const GENERIC_ARGV0: &[&str] = &[
    "python", "python3", "uwsgi", "gunicorn", "httpd", "apache2", "mod_wsgi", "-c", "ipython",
];

/// A label-safe, bounded product name: the part of a token before `/`.
/// An OpenStack client library or the SDK: what a user's script or CLI calls through.
pub fn is_client_library(product: &str) -> bool {
    product == "openstacksdk"
        || product == "keystoneauth1"
        || (product.starts_with("python-") && product.ends_with("client"))
}

fn product(token: &str) -> Option<String> {
    let name = token.split('/').next().unwrap_or("");
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then(|| name.to_string())
}

pub fn classify(user_agent: &str) -> Agent {
    let mut tokens = user_agent.split_ascii_whitespace();
    let Some(first) = tokens.next() else {
        return Agent::Other;
    };
    let second = tokens.next();
    if second
        .into_iter()
        .chain(tokens)
        .any(|t| t.starts_with("keystonemiddleware.auth_token/"))
    {
        return product(first).map_or(Agent::Other, Agent::TokenMiddleware);
    }
    let ksa_next = second.is_some_and(|t| t.starts_with("keystoneauth1/"));
    if ksa_next && !first.contains('/') {
        let generic = GENERIC_ARGV0.contains(&first)
            || (first.starts_with("python")
                && first[6..].bytes().all(|b| b.is_ascii_digit() || b == b'.'));
        if !generic && let Some(p) = product(first) {
            return Agent::Process(p);
        }
        return Agent::Other;
    }
    let Some(p) = product(first) else {
        return Agent::Other;
    };
    if is_client_library(&p) {
        Agent::ClientLibrary(p)
    } else {
        Agent::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_agents_of_section_7_4() {
        let ksa = " keystoneauth1/5.18.1 python-requests/2.34.2 CPython/3.11.7";
        assert_eq!(
            classify(&format!("nova-compute{ksa}")),
            Agent::Process("nova-compute".into())
        );
        assert_eq!(classify(&format!("python3{ksa}")), Agent::Other);
        assert_eq!(classify(&format!("python3.11{ksa}")), Agent::Other);
        assert_eq!(
            classify("python-novaclient"),
            Agent::ClientLibrary("python-novaclient".into())
        );
        assert_eq!(
            classify(&format!("openstacksdk/4.22.0{ksa}")),
            Agent::ClientLibrary("openstacksdk".into())
        );
        assert_eq!(
            classify(&format!(
                "nova/34.0.0 keystonemiddleware.auth_token/10.7.0{ksa}"
            )),
            Agent::TokenMiddleware("nova".into())
        );
        assert_eq!(classify("curl/8.5.0"), Agent::Other);
        assert_eq!(classify(""), Agent::Other);
        assert_eq!(classify("nova\u{0}x keystoneauth1/1"), Agent::Other);
    }
}
