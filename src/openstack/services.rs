//! OpenStack's names, in one place: service types and the processes that serve their
//! APIs, default ports and devstack path prefixes (oslo-wire.md §8.1), and the client
//! libraries and tools users call through (§7.4).

/// Service type names by default API port (8780 is kolla's placement).
pub const DEFAULT_PORTS: &[(u16, &str)] = &[
    (5000, "keystone"),
    (35357, "keystone"),
    (8774, "nova"),
    (8778, "placement"),
    (8780, "placement"),
    (9696, "neutron"),
    (9292, "glance"),
    (8776, "cinder"),
    (8004, "heat"),
    (8000, "heat-cfn"),
    (9001, "designate"),
    (9876, "octavia"),
    (8080, "swift"),
    (9311, "barbican"),
    (6385, "ironic"),
    (8775, "nova-metadata"),
];

/// devstack-style path prefixes on a shared web server.
pub const DEFAULT_PREFIXES: &[(&str, &str)] = &[
    ("/identity", "keystone"),
    ("/compute", "nova"),
    ("/placement", "placement"),
    ("/networking", "neutron"),
    ("/image", "glance"),
    ("/volume", "cinder"),
    ("/heat-api", "heat"),
    ("/dns", "designate"),
    ("/load-balancer", "octavia"),
    ("/key-manager", "barbican"),
    ("/baremetal", "ironic"),
];

/// The process that serves a service type's API (a name we do not know stands for
/// itself). keystonemiddleware names its project (`nova`), which runs in this process too.
pub fn api_process(service: &str) -> &str {
    match service {
        "nova" => "nova-api",
        "neutron" => "neutron-server",
        "glance" => "glance-api",
        "placement" => "placement-api",
        "cinder" => "cinder-api",
        "heat" => "heat-api",
        "heat-cfn" => "heat-api-cfn",
        "designate" => "designate-api",
        "octavia" => "octavia-api",
        "barbican" => "barbican-api",
        "ironic" => "ironic-api",
        "swift" => "swift-proxy-server",
        "nova-metadata" => "nova-api-metadata",
        "manila" => "manila-api",
        "magnum" => "magnum-api",
        "aodh" => "aodh-api",
        "masakari" => "masakari-api",
        other => other,
    }
}

/// What a REST caller that is not a user names: `external`.
pub const EXTERNAL: &str = "external";

/// The canonical name of a client library or user tool, from a User-Agent product token
/// (without its version): the SDK, the CLI, the service clients, Go and Terraform
/// clients, the dashboard, curl. None: not a known client.
pub fn client_tool(product: &str) -> Option<&str> {
    // every REST request asks this: compared in place, not lowered into a new string
    let is = |names: &[&str]| names.iter().any(|n| product.eq_ignore_ascii_case(n));
    let at = |i: usize, word: &str| {
        product
            .get(i..i + word.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(word))
    };
    // python-novaclient, python-cinderclient, …
    let service_client = product.len() >= "python-client".len()
        && at(0, "python-")
        && at(product.len() - "client".len(), "client");
    let known = if is(&[
        "openstacksdk",
        "shade",
        "osc-lib",
        "keystoneauth1",
        "gophercloud",
        "curl",
        "wget",
        "httpie",
        "horizon",
    ]) {
        product
    } else if is(&["openstack", "python-openstackclient"]) {
        "python-openstackclient"
    } else if is(&["openstack_dashboard", "openstack-dashboard"]) {
        "horizon"
    } else if is(&["terraform", "terraform-provider-openstack", "opentofu"]) {
        "terraform"
    } else if service_client {
        product
    } else {
        return None;
    };
    Some(known)
}

/// A tool only users run (the CLI, the dashboard, Terraform, Go clients, curl), unlike
/// the service client libraries and the SDK, which services use too.
pub fn is_user_tool(name: &str) -> bool {
    client_tool(name).is_some_and(|t| {
        t == "python-openstackclient"
            || !(t.starts_with("python-") || t == "openstacksdk" || t == "keystoneauth1")
    })
}

/// A caller that is a user's tool or a library (or nobody named), not a service process.
pub fn is_user_side(caller: &str) -> bool {
    caller == EXTERNAL || client_tool(caller).is_some()
}

/// argv[0] values that name an interpreter or a WSGI container, not a service (what
/// keystoneauth reports when a process set no name of its own).
pub fn is_generic_argv0(name: &str) -> bool {
    const GENERIC: &[&str] = &[
        "python", "python3", "uwsgi", "gunicorn", "httpd", "apache2", "mod_wsgi", "-c", "ipython",
        "ipython3", "pytest", "bash", "sh",
    ];
    GENERIC.contains(&name)
        || name
            .strip_prefix("python")
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_and_processes() {
        assert_eq!(
            client_tool("python-neutronclient"),
            Some("python-neutronclient")
        );
        assert_eq!(client_tool("openstack"), Some("python-openstackclient"));
        assert_eq!(client_tool("openstack_dashboard"), Some("horizon"));
        assert_eq!(client_tool("nova-compute"), None);
        // product tokens are matched whatever their case, and kept as sent
        assert_eq!(client_tool("Python-NovaClient"), Some("Python-NovaClient"));
        assert_eq!(client_tool("OpenStack"), Some("python-openstackclient"));
        assert_eq!(client_tool("Terraform"), Some("terraform"));
        assert_eq!(client_tool("python-client"), Some("python-client"));
        assert_eq!(client_tool("python-"), None);
        assert_eq!(client_tool("python-clienté"), None);
        assert!(is_user_side("external") && is_user_side("openstacksdk"));
        assert!(!is_user_side("neutron-server"));
        assert!(is_user_tool("terraform") && is_user_tool("python-openstackclient"));
        assert!(!is_user_tool("python-novaclient") && !is_user_tool("openstacksdk"));
        assert!(is_generic_argv0("python3.11") && !is_generic_argv0("python-novaclient"));
        assert_eq!(api_process("neutron"), "neutron-server");
        assert_eq!(api_process("nova-conductor"), "nova-conductor");
    }
}
