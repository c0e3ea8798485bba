//! The graph UI's files, embedded in the binary so that `/` works with no network: our own
//! page, script and style from `ui/`, and cytoscape.js with its dagre layout from
//! `ui/node_modules` (fetched from npm by build.rs, never committed).

pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";

pub const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../ui/index.html"),
    },
    Asset {
        path: "/ui/app.js",
        content_type: JS,
        body: include_bytes!("../ui/app.js"),
    },
    Asset {
        path: "/ui/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../ui/style.css"),
    },
    Asset {
        path: "/ui/vendor/cytoscape.min.js",
        content_type: JS,
        body: include_bytes!("../ui/node_modules/cytoscape/dist/cytoscape.min.js"),
    },
    Asset {
        path: "/ui/vendor/cytoscape-dagre.min.js",
        content_type: JS,
        body: include_bytes!("../ui/node_modules/cytoscape-dagre/dist/cytoscape-dagre.min.js"),
    },
];
