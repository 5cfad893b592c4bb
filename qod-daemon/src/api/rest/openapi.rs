//! The OpenAPI documents this node serves at `…/v1/openapi.json`: CAMARA's own files
//! (quality-on-demand 1.1.0 and qos-profiles 1.1.0, `qod-daemon/openapi/`, converted from
//! CAMARA's YAML without change), with `servers` and security filled in for this node and every
//! way qodd differs from CAMARA's file said with `x-qod-*` extensions.

use serde_json::{Value, json};

const QUALITY_ON_DEMAND: &str = include_str!("../../../openapi/quality-on-demand.json");
const QOS_PROFILES: &str = include_str!("../../../openapi/qos-profiles.json");

/// How this node differs from CAMARA's quality-on-demand file (README: "REST API").
pub const QOD_DIFFERENCES: &[&str] = &[
    "Request bodies are strict (CAMARA r4.1): a property the schema does not define, at any depth, is 400 INVALID_ARGUMENT; so is null for any property.",
    "Sessions are installed before createSession answers: SessionInfo is AVAILABLE at once, never REQUESTED.",
    "sinkCredential is write-only: SessionInfo never carries it (its token is a secret, and CAMARA's ACCESSTOKEN schema cannot be echoed without it).",
    "A sink must be https://, or http:// to a host the node's configuration names (notifications.allow_http_hosts); a literal address in a refused range is 400 INVALID_SINK.",
    "Ports are 1 to 65535 (CAMARA r4.1): port 0 is 400 OUT_OF_RANGE.",
    "A duration outside the profile's bounds is 400 QUALITY_ON_DEMAND.DURATION_OUT_OF_RANGE, or INVALID_ARGUMENT where the configuration says so (duration_out_of_range).",
    "A body that is not application/json, larger than limits.max_message_bytes, or slower than rest.request_timeout_ms is 400 INVALID_ARGUMENT.",
    "While the node restores its sessions at start every operation is 503 UNAVAILABLE.",
    "An undocumented method on a served path is 405 with an Allow header; an unknown path is 404 NOT_FOUND.",
];

/// How this node differs from CAMARA's qos-profiles file.
pub const PROFILE_DIFFERENCES: &[&str] = &[
    "Request bodies are strict (CAMARA r4.1): a property the schema does not define, at any depth, is 400 INVALID_ARGUMENT; so is null for any property.",
    "Every profile of the node applies to every device the node serves: a device filter only has to be one this node serves (else 404 IDENTIFIER_NOT_FOUND).",
    "While the node restores its sessions at start every operation is 503 UNAVAILABLE.",
];

/// How callers authenticate, for the documents' security schemes.
#[derive(Clone, Debug)]
pub enum Security {
    /// `--insecure`: no token.
    None,
    /// Bearer JWTs from `issuer`, verified against the node's key set.
    Bearer { issuer: String, audience: String },
}

/// The two documents, ready but for their `servers`.
#[derive(Clone, Debug)]
pub struct Documents {
    quality_on_demand: Value,
    qos_profiles: Value,
    public_url: Option<String>,
}

impl Documents {
    pub fn new(security: &Security, public_url: Option<String>) -> Self {
        let prepare = |text: &str, differences: &[&str]| {
            let mut doc: Value = serde_json::from_str(text).unwrap_or_else(|e| {
                // Embedded at build time and checked by a unit test.
                json!({ "openapi": "3.0.3", "x-qod-error": e.to_string() })
            });
            adapt(&mut doc, security, differences);
            doc
        };
        Self {
            quality_on_demand: prepare(QUALITY_ON_DEMAND, QOD_DIFFERENCES),
            qos_profiles: prepare(QOS_PROFILES, PROFILE_DIFFERENCES),
            public_url,
        }
    }

    /// The configured `apiRoot` (`rest.public_url`), if any.
    pub fn public_url(&self) -> Option<&str> {
        self.public_url.as_deref()
    }

    pub fn quality_on_demand(&self, api_root: &str) -> Value {
        with_server(&self.quality_on_demand, api_root, "quality-on-demand/v1")
    }

    pub fn qos_profiles(&self, api_root: &str) -> Value {
        with_server(&self.qos_profiles, api_root, "qos-profiles/v1")
    }
}

fn with_server(doc: &Value, api_root: &str, base: &str) -> Value {
    let mut doc = doc.clone();
    doc["servers"] = json!([{
        "url": format!("{}/{base}", api_root.trim_end_matches('/')),
        "description": "this qodd node",
    }]);
    doc
}

const OPERATIONS: [&str; 4] = ["get", "post", "delete", "put"];

fn adapt(doc: &mut Value, security: &Security, differences: &[&str]) {
    doc["info"]["x-qod-differences"] = json!(differences);
    doc["info"]["x-qod-server"] = json!(format!("qodd {}", env!("CARGO_PKG_VERSION")));
    match security {
        Security::None => {
            doc["info"]["x-qod-security"] = json!(
                "insecure (labs only): no TLS and no access token; every call is the local operator's"
            );
            each_operation(doc, |op| op["security"] = json!([]));
        }
        Security::Bearer { issuer, audience } => {
            let issuer = issuer.trim_end_matches('/');
            doc["components"]["securitySchemes"]["openId"]["openIdConnectUrl"] =
                json!(format!("{issuer}/.well-known/openid-configuration"));
            doc["components"]["securitySchemes"]["openId"]["x-qod-token"] = json!(format!(
                "Authorization: Bearer <JWT> issued by {issuer} for the audience {audience}, signed by a key of the node's key set, carrying CAMARA's scopes (scope or scp) and the client id (client_id); a device claim makes it three-legged"
            ));
        }
    }
    // Every operation may also answer 503 while the node restores its sessions.
    let unavailable = json!({
        "description": "Service Unavailable: the node is restoring its sessions (x-qod)",
        "headers": { "x-correlator": { "$ref": "#/components/headers/x-correlator" } },
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorInfo" } } },
    });
    each_operation(doc, |op| op["responses"]["503"] = unavailable.clone());
}

/// Calls `f` with every operation object of the document's paths.
fn each_operation(doc: &mut Value, mut f: impl FnMut(&mut Value)) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for op in paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|p| p.iter_mut())
        .filter(|(m, _)| OPERATIONS.contains(&m.as_str()))
        .map(|(_, op)| op)
    {
        f(op);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_camaras_with_this_nodes_server() {
        let docs = Documents::new(
            &Security::Bearer {
                issuer: "https://issuer.example/".into(),
                audience: "qod".into(),
            },
            None,
        );
        let qod = docs.quality_on_demand("https://node:9443/camara");
        assert_eq!(qod["info"]["version"], "1.1.0");
        assert_eq!(
            qod["servers"][0]["url"],
            "https://node:9443/camara/quality-on-demand/v1"
        );
        assert!(qod["paths"]["/sessions"]["post"]["responses"]["201"].is_object());
        assert!(qod["paths"]["/sessions"]["post"]["responses"]["503"].is_object());
        assert_eq!(
            qod["components"]["securitySchemes"]["openId"]["openIdConnectUrl"],
            "https://issuer.example/.well-known/openid-configuration"
        );
        assert!(qod["info"]["x-qod-differences"].is_array());
        let profiles = docs.qos_profiles("http://h");
        assert_eq!(profiles["info"]["version"], "1.1.0");
        assert!(profiles["paths"]["/retrieve-qos-profiles"]["post"].is_object());
        assert!(profiles.get("x-qod-error").is_none());
        let open = Documents::new(&Security::None, None).quality_on_demand("http://h");
        assert_eq!(
            open["paths"]["/sessions"]["post"]["security"],
            serde_json::json!([])
        );
    }
}
