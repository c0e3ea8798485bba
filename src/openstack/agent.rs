//! Who is calling, from the User-Agent (oslo-wire.md §7.4).
//!
//! keystoneauth1 builds `<app>[/<v>] [<client>[/<v>]] [<extra>/<v> …] keystoneauth1/<v>
//! python-requests/<v> <impl>/<v>`: `<app>` is the process's own name when it set one,
//! `<client>` a service client library (python-novaclient), the extras what the SDK or
//! the CLI add (openstacksdk, osc-lib). With none of those it puts `basename(argv[0])`
//! first, which is the service's process name (`nova-compute keystoneauth1/…`). Older
//! service clients send their bare name (`python-neutronclient`); keystonemiddleware
//! sends `<project>/<v> keystonemiddleware.auth_token/<v> keystoneauth1/…`; Go clients
//! end in `gophercloud/<v>` after what their user prepended (Terraform, Kubernetes).

use super::services::{client_tool, is_generic_argv0};

/// What a User-Agent tells about the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Agent {
    /// A service process by its app name or argv[0] (`nova-compute`).
    Process(String),
    /// keystonemiddleware validating a token for an API service (`nova`).
    TokenMiddleware(String),
    /// A client library or user tool (`python-novaclient`, `openstacksdk`,
    /// `python-openstackclient`, `gophercloud`, `terraform`, `curl`): used by services
    /// and users alike, so it names no process.
    ClientLibrary(String),
    Other,
}

/// The product of a `name/version` token, if it is a label-safe bounded name.
fn product(token: &str) -> Option<&str> {
    let name = token.split('/').next().unwrap_or("");
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then_some(name)
}

/// The first known client library or tool among `tokens`.
fn first_tool<'a>(tokens: &[&'a str]) -> Option<&'a str> {
    tokens
        .iter()
        .filter_map(|t| product(t))
        .find_map(client_tool)
}

pub fn classify(user_agent: &str) -> Agent {
    let tokens: Vec<&str> = user_agent.split_ascii_whitespace().collect();
    let Some(first) = tokens.first() else {
        return Agent::Other;
    };
    if tokens[1..]
        .iter()
        .any(|t| t.starts_with("keystonemiddleware.auth_token/"))
    {
        return product(first).map_or(Agent::Other, |p| Agent::TokenMiddleware(p.into()));
    }
    let tool = |tokens: &[&str]| first_tool(tokens).map(|t| Agent::ClientLibrary(t.into()));
    let Some(ksa) = tokens.iter().position(|t| t.starts_with("keystoneauth1/")) else {
        // not keystoneauth: a bare service client name, a Go or Terraform client, curl
        return tool(&tokens).unwrap_or(Agent::Other);
    };
    let named = &tokens[..ksa];
    let Some(app) = named.first().and_then(|t| product(t)) else {
        return Agent::Other; // keystoneauth found no name at all
    };
    if let Some(t) = client_tool(app) {
        return Agent::ClientLibrary(t.into());
    }
    if is_generic_argv0(app) {
        // an interpreter's name: a library after it may still say what called
        return tool(&named[1..]).unwrap_or(Agent::Other);
    }
    Agent::Process(app.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// User-Agents as real OpenStack services, clients and tools send them.
    #[test]
    fn real_user_agents() {
        let p = |s: &str| Agent::Process(s.into());
        let lib = |s: &str| Agent::ClientLibrary(s.into());
        let mw = |s: &str| Agent::TokenMiddleware(s.into());
        let cases: &[(&str, Agent)] = &[
            // bare keystoneauth: argv[0]
            (
                "nova-compute keystoneauth1/5.18.1 python-requests/2.34.2 CPython/3.11.7",
                p("nova-compute"),
            ),
            (
                "nova-scheduler keystoneauth1/5.6.0 python-requests/2.31.0 CPython/3.10.12",
                p("nova-scheduler"),
            ),
            // the app name before client libraries and SDK extras
            (
                "nova-compute openstacksdk/3.3.0 keystoneauth1/5.6.0 python-requests/2.32.3 CPython/3.11.7",
                p("nova-compute"),
            ),
            (
                "neutron-server python-novaclient keystoneauth1/5.6.0 python-requests/2.32.3 CPython/3.11.7",
                p("neutron-server"),
            ),
            (
                "cinder-volume/24.1.0 python-glanceclient/4.6.0 keystoneauth1/5.6.0 python-requests/2.31.0 CPython/3.10.12",
                p("cinder-volume"),
            ),
            (
                "ironic-conductor openstacksdk/4.0.1 keystoneauth1/5.8.0 python-requests/2.32.3 CPython/3.12.3",
                p("ironic-conductor"),
            ),
            (
                "octavia-worker/15.0.0 openstacksdk/4.0.1 osc-lib/3.1.0 keystoneauth1/5.8.0 python-requests/2.32.3 CPython/3.12.3",
                p("octavia-worker"),
            ),
            // service clients alone: the library
            ("python-novaclient", lib("python-novaclient")),
            ("python-neutronclient", lib("python-neutronclient")),
            ("python-glanceclient", lib("python-glanceclient")),
            ("python-cinderclient", lib("python-cinderclient")),
            (
                "python-neutronclient keystoneauth1/5.18.1 python-requests/2.34.2 CPython/3.11.7",
                lib("python-neutronclient"),
            ),
            (
                "python-cinderclient/9.5.0 keystoneauth1/5.6.0 python-requests/2.31.0 CPython/3.10.12",
                lib("python-cinderclient"),
            ),
            // the SDK, the CLI, the dashboard
            (
                "openstacksdk/4.22.0 keystoneauth1/5.18.1 python-requests/2.34.2 CPython/3.11.7",
                lib("openstacksdk"),
            ),
            (
                "python-openstackclient/7.1.2 osc-lib/3.1.0 openstacksdk/4.0.1 keystoneauth1/5.8.0 python-requests/2.32.3 CPython/3.12.3",
                lib("python-openstackclient"),
            ),
            (
                "openstack keystoneauth1/5.8.0 python-requests/2.32.3 CPython/3.12.3",
                lib("python-openstackclient"),
            ),
            (
                "openstack_dashboard keystoneauth1/5.6.0 python-requests/2.31.0 CPython/3.10.12",
                lib("horizon"),
            ),
            (
                "uwsgi python-novaclient keystoneauth1/5.6.0 python-requests/2.31.0 CPython/3.10.12",
                lib("python-novaclient"),
            ),
            // keystonemiddleware validating tokens: the project it runs in
            (
                "nova/34.0.0 keystonemiddleware.auth_token/10.7.0 keystoneauth1/5.18.1 python-requests/2.34.2 CPython/3.11.7",
                mw("nova"),
            ),
            (
                "neutron keystonemiddleware.auth_token/10.7.0 keystoneauth1/5.18.1 python-requests/2.34.2 CPython/3.11.7",
                mw("neutron"),
            ),
            // Go, Terraform, Kubernetes, curl
            ("gophercloud/2.0.0", lib("gophercloud")),
            (
                "HashiCorp Terraform/1.9.8 (+https://www.terraform.io) Terraform Plugin SDK/2.10.1 terraform-provider-openstack/3.0.0 gophercloud/2.0.0",
                lib("terraform"),
            ),
            (
                "openstack-cloud-controller-manager/v1.31.0 gophercloud/2.0.0",
                lib("gophercloud"),
            ),
            ("curl/8.5.0", lib("curl")),
            // nothing that names anyone
            (
                "python3 keystoneauth1/5.18.1 python-requests/2.34.2 CPython/3.11.7",
                Agent::Other,
            ),
            (
                "python3.11 keystoneauth1/5.18.1 python-requests/2.34.2 CPython/3.11.7",
                Agent::Other,
            ),
            (
                "keystoneauth1/5.18.1 python-requests/2.34.2 CPython/3.11.7",
                Agent::Other,
            ),
            ("python-requests/2.31.0", Agent::Other),
            (
                "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
                Agent::Other,
            ),
            ("", Agent::Other),
            ("nova\u{0}x keystoneauth1/1", Agent::Other),
        ];
        for (ua, want) in cases {
            assert_eq!(&classify(ua), want, "{ua:?}");
        }
    }
}
