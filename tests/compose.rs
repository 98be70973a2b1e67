//! docker-compose.yml cannot run here (no Docker engine), so it is checked by parsing: every
//! service is there, every address a connector is given points at a port its service listens
//! on, every environment variable the connector reads is set, the versions and host ports match
//! scripts/services.sh, and the image the connector services build is the repo's multi-stage
//! Dockerfile with everything the build includes. Prometheus scrapes every connector and loads the
//! alert rules, Grafana has the dashboard provisioned, and the real-CRM override
//! (docker-compose.crm.yml) takes its credentials from Docker secrets. No services needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compose() -> Value {
    serde_norway::from_str(&read("docker-compose.yml")).expect("docker-compose.yml is valid YAML")
}

fn service<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["services"]
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no service {name}"))
}

fn env(svc: &Value) -> BTreeMap<String, String> {
    let e = svc["environment"].as_object().cloned().unwrap_or_default();
    e.into_iter()
        .map(|(k, v)| {
            (
                k,
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string()),
            )
        })
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

/// A default from scripts/services.sh, e.g. `KAFKA_PORT=${KAFKA_PORT:-19092}` -> "19092".
fn services_default(var: &str) -> String {
    let text = read("scripts/services.sh");
    let prefix = format!("{var}=${{{var}:-");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("services.sh sets no default {var}"));
    line[prefix.len()..].trim_end_matches('}').to_owned()
}

/// The ports each service listens on inside the network: the container side of `ports`, the
/// Kafka listeners, and the emulator's `--listen` address.
fn listening(c: &Value) -> BTreeMap<String, BTreeSet<u16>> {
    let mut out: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    for (name, svc) in c["services"].as_object().unwrap() {
        let ports = out.entry(name.clone()).or_default();
        for p in strings(&svc["ports"]) {
            ports.insert(p.rsplit(':').next().unwrap().parse().unwrap());
        }
        for l in env(svc)
            .get("KAFKA_LISTENERS")
            .map(|l| l.split(',').map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default()
        {
            ports.insert(l.rsplit(':').next().unwrap().parse().unwrap());
        }
        let cmd = strings(&svc["command"]);
        if let Some(i) = cmd.iter().position(|a| a == "--listen") {
            ports.insert(cmd[i + 1].rsplit(':').next().unwrap().parse().unwrap());
        }
    }
    out
}

/// The host-published port of a container port.
fn published(svc: &Value, container: u16) -> Option<u16> {
    strings(&svc["ports"]).iter().find_map(|p| {
        let (host, inner) = p.rsplit_once(':')?;
        (inner.parse::<u16>().ok()? == container).then(|| host.rsplit(':').next()?.parse().ok())?
    })
}

/// `service:port` pairs named in a value (URLs, broker lists).
fn addresses(value: &str, services: &BTreeSet<String>) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for part in value.split([',', '/', '@']) {
        if let Some((host, port)) = part.split_once(':')
            && let (true, Ok(port)) = (services.contains(host), port.parse::<u16>())
        {
            out.push((host.to_owned(), port));
        }
    }
    out
}

/// `{ env = "NAME" }` references in a connector config (secrets read from the environment).
fn env_refs(v: &toml::Value, out: &mut BTreeSet<String>) {
    match v {
        toml::Value::Table(t) if t.len() == 1 && t.get("env").is_some_and(toml::Value::is_str) => {
            out.insert(t["env"].as_str().unwrap().to_owned());
        }
        toml::Value::Table(t) => t.values().for_each(|v| env_refs(v, out)),
        toml::Value::Array(a) => a.iter().for_each(|v| env_refs(v, out)),
        _ => {}
    }
}

/// The connector config a service runs, from its `--config /etc/trusst-cdc/<file>` argument
/// (the Dockerfile copies connector-config/ there).
fn config_of(svc: &Value) -> (String, toml::Table) {
    let cmd = strings(&svc["command"]);
    let i = cmd
        .iter()
        .position(|a| a == "--config")
        .expect("a connector service passes --config");
    let file = cmd[i + 1]
        .strip_prefix("/etc/trusst-cdc/")
        .expect("configs come from /etc/trusst-cdc")
        .to_owned();
    let table = toml::from_str(&read(&format!("connector-config/{file}"))).unwrap();
    (file, table)
}

const SINKS: [(&str, &str); 3] = [
    ("sink-salesforce", "salesforce"),
    ("sink-dynamics", "dataverse"),
    ("sink-mulesoft", "mulesoft"),
];

#[test]
fn every_service_is_there() {
    let c = compose();
    let names: BTreeSet<&str> = c["services"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let want = [
        "postgres",
        "kafka",
        "registry",
        "crm-emulator",
        "source",
        "sink-salesforce",
        "sink-dynamics",
        "sink-mulesoft",
        "prometheus",
        "grafana",
    ];
    assert_eq!(
        names,
        want.into_iter().collect(),
        "services in docker-compose.yml"
    );
    // The connector's own services run the repo's image with a command the binary knows.
    for name in [
        "crm-emulator",
        "source",
        "sink-salesforce",
        "sink-dynamics",
        "sink-mulesoft",
    ] {
        let svc = service(&c, name);
        assert_eq!(svc["build"], ".", "{name} builds the repo's Dockerfile");
        let sub = strings(&svc["command"])[0].clone();
        assert!(
            ["crm-emulator", "source", "sink"].contains(&sub.as_str()),
            "{name}: unknown subcommand {sub}"
        );
    }
}

#[test]
fn postgres_has_logical_wal_and_the_fixture_schema() {
    let c = compose();
    let pg = service(&c, "postgres");
    assert!(
        strings(&pg["command"])
            .iter()
            .any(|a| a == "wal_level=logical"),
        "{}",
        pg["command"]
    );
    let mounts = strings(&pg["volumes"]);
    for fixture in [
        "tests/fixtures/trusst_schema.sql",
        "tests/fixtures/cdc_setup.sql",
    ] {
        assert!(Path::new(ROOT).join(fixture).is_file(), "{fixture} exists");
        assert!(
            mounts
                .iter()
                .any(|m| m.starts_with(&format!("./{fixture}:/docker-entrypoint-initdb.d/"))),
            "{fixture} is loaded at init: {mounts:?}"
        );
    }
    assert_eq!(
        pg["image"], "postgres:15",
        "the PostgreSQL major version Debian bookworm installs natively"
    );
}

#[test]
fn versions_and_host_ports_match_services_sh() {
    let c = compose();
    let kafka = service(&c, "kafka");
    assert_eq!(
        kafka["image"],
        format!("apache/kafka:{}", services_default("KAFKA_VERSION"))
    );
    let roles = env(kafka)["KAFKA_PROCESS_ROLES"].clone();
    assert!(
        roles.contains("controller") && roles.contains("broker"),
        "single-node KRaft: {roles}"
    );
    let registry = service(&c, "registry");
    assert_eq!(
        registry["image"],
        format!(
            "apicurio/apicurio-registry:{}",
            services_default("APICURIO_VERSION")
        )
    );
    // Host ports equal the native defaults, so the same client settings work against either.
    let port = |v: &str| services_default(v).parse::<u16>().unwrap();
    assert_eq!(
        published(service(&c, "postgres"), 5432),
        Some(port("PGPORT"))
    );
    assert_eq!(published(registry, 8080), Some(port("REGISTRY_PORT")));
    let host_listener = env(kafka)["KAFKA_ADVERTISED_LISTENERS"]
        .split(',')
        .find(|l| l.contains("127.0.0.1"))
        .unwrap()
        .to_owned();
    let host_port: u16 = host_listener.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(host_port, port("KAFKA_PORT"));
    assert_eq!(published(kafka, host_port), Some(host_port));
    // The shipped sink configs point at the emulator on 18080 (the port native runs use).
    assert_eq!(published(service(&c, "crm-emulator"), 18080), Some(18080));
}

#[test]
fn every_address_points_at_a_listening_port() {
    let c = compose();
    let listening = listening(&c);
    let names: BTreeSet<String> = listening.keys().cloned().collect();
    let mut checked = 0;
    for (name, svc) in c["services"].as_object().unwrap() {
        for (var, value) in env(svc) {
            for (host, port) in addresses(&value, &names) {
                assert!(
                    listening[&host].contains(&port),
                    "{name}: {var}={value}: {host} does not listen on {port} ({:?})",
                    listening[&host]
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 12,
        "only {checked} addresses found: the parser missed some"
    );
    // Kafka clients inside the network use the listener advertised under the service's name.
    assert!(env(service(&c, "kafka"))["KAFKA_ADVERTISED_LISTENERS"].contains("kafka:9092"));
}

#[test]
fn every_variable_the_connector_reads_is_set() {
    let c = compose();
    let src = env(service(&c, "source"));
    for var in ["DATABASE_URL", "KAFKA_BROKERS"] {
        assert!(src.contains_key(var), "source needs {var}");
    }
    let avro = src.get("TRUSST_FORMAT").map(String::as_str) == Some("avro");
    if avro {
        assert!(
            src.contains_key("SCHEMA_REGISTRY_URL"),
            "an Avro source needs SCHEMA_REGISTRY_URL"
        );
    }
    let (_, emulator) = config_of(service(&c, "crm-emulator"));
    for (name, system) in SINKS {
        let svc = service(&c, name);
        let vars = env(svc);
        assert!(
            vars.contains_key("KAFKA_BROKERS"),
            "{name} needs KAFKA_BROKERS"
        );
        if avro {
            assert!(
                vars.contains_key("SCHEMA_REGISTRY_URL"),
                "{name} reads Avro events: it needs SCHEMA_REGISTRY_URL"
            );
        }
        let (file, config) = config_of(svc);
        let mut refs = BTreeSet::new();
        env_refs(&toml::Value::Table(config.clone()), &mut refs);
        assert!(
            !refs.is_empty(),
            "{file} reads its secret from the environment"
        );
        for var in &refs {
            assert!(
                vars.contains_key(var),
                "{name}: {file} reads {var}, which is not set"
            );
        }
        // The emulator accepts exactly these credentials.
        let target = config["sink"]["target"].as_str().unwrap();
        let secret = &vars[refs
            .iter()
            .find(|v| v.contains("SECRET"))
            .expect("a client secret")];
        assert_eq!(
            emulator[system]["client_secret"].as_str(),
            Some(secret.as_str()),
            "{name}: the emulator's secret"
        );
        assert_eq!(
            emulator[system]["client_id"], config[target]["client_id"],
            "{name}: the emulator's client id"
        );
        // Endpoints in the shipped configs are the host's loopback: inside the network each must
        // be overridden (the variables SinkConfig::resolve reads).
        let overrides: &[(&str, &str)] = match target {
            "salesforce" => &[("login_url", "SALESFORCE_LOGIN_URL")],
            "dynamics" => &[("url", "DYNAMICS_URL"), ("token_url", "DYNAMICS_TOKEN_URL")],
            _ => &[("url", "MULESOFT_URL")],
        };
        for (key, var) in overrides {
            if config[target]
                .get(*key)
                .and_then(toml::Value::as_str)
                .is_some_and(|u| u.contains("127.0.0.1"))
            {
                let v = vars.get(*var).unwrap_or_else(|| {
                    panic!("{name}: {target}.{key} is 127.0.0.1 and {var} is not set")
                });
                assert!(
                    v.contains("crm-emulator:"),
                    "{name}: {var}={v} must reach the emulator"
                );
            }
        }
    }
}

#[test]
fn the_dockerfile_is_multi_stage_and_copies_what_the_build_includes() {
    let dockerfile = read("Dockerfile");
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert!(
        froms.last().unwrap().contains("-slim"),
        "small runtime image: {}",
        froms.last().unwrap()
    );
    assert!(
        dockerfile.contains("COPY --from=build /src/target/release/trusst-cdc"),
        "the runtime stage takes only the binary"
    );
    assert!(dockerfile.contains("COPY connector-config /etc/trusst-cdc"));
    // Every file the crate's sources include in a release build must be in the build context
    // (test modules, at the end of their files, are not built there).
    let mut needed = BTreeSet::new();
    let mut dirs = vec![Path::new(ROOT).join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.split("#[cfg(test)]").next().unwrap();
            for (i, _) in text.match_indices("include_") {
                let rest = &text[i..];
                let Some(start) = rest.find("!(\"") else {
                    continue;
                };
                if start > "include_bytes".len() {
                    continue;
                }
                let arg = &rest[start + 3..];
                let included = path.parent().unwrap().join(&arg[..arg.find('"').unwrap()]);
                let included = included
                    .canonicalize()
                    .unwrap_or_else(|e| panic!("{}: {e}", included.display()));
                let top = included
                    .strip_prefix(ROOT)
                    .unwrap()
                    .components()
                    .next()
                    .unwrap();
                needed.insert(top.as_os_str().to_string_lossy().into_owned());
            }
        }
    }
    assert!(
        needed.contains("schema"),
        "the Avro schema is included: {needed:?}"
    );
    for top in needed {
        assert!(
            dockerfile
                .lines()
                .any(|l| l.starts_with(&format!("COPY {top}"))),
            "the Dockerfile's build stage must COPY {top}/"
        );
    }
}

/// The source and each sink serve /metrics on every interface of their container (the default,
/// loopback, cannot be scraped from outside), each published on a host port of its own.
#[test]
fn metrics_endpoints_are_reachable_from_outside_their_containers() {
    let c = compose();
    let mut host_ports = BTreeSet::new();
    for name in [
        "source",
        "sink-salesforce",
        "sink-dynamics",
        "sink-mulesoft",
    ] {
        let svc = service(&c, name);
        let listen = env(svc)
            .get("TRUSST_METRICS_LISTEN")
            .cloned()
            .unwrap_or_default();
        let (host, port) = listen
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{name}: TRUSST_METRICS_LISTEN={listen:?}"));
        assert_eq!(host, "0.0.0.0", "{name} must bind every interface");
        let port: u16 = port.parse().unwrap();
        let published = published(svc, port)
            .unwrap_or_else(|| panic!("{name}: metrics port {port} is not published"));
        assert!(
            host_ports.insert(published),
            "{name}: host port {published} is taken twice"
        );
    }
}

fn yaml_file(path: &str) -> Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A `host:dir` bind mount of a service: the host path of the container path `dir`.
fn mount_of(svc: &Value, container: &str) -> Option<String> {
    strings(&svc["volumes"]).into_iter().find_map(|v| {
        let mut parts = v.split(':');
        let (host, inner) = (parts.next()?, parts.next()?);
        (inner == container).then(|| host.trim_start_matches("./").to_owned())
    })
}

/// The metrics address of each connector service inside the network (`service:port`).
fn metrics_targets(c: &Value) -> BTreeSet<String> {
    [
        "source",
        "sink-salesforce",
        "sink-dynamics",
        "sink-mulesoft",
    ]
    .iter()
    .map(|name| {
        let listen = env(service(c, name))["TRUSST_METRICS_LISTEN"].clone();
        format!("{name}:{}", listen.rsplit(':').next().unwrap())
    })
    .collect()
}

/// Prometheus scrapes the source and every sink on their metrics ports, labels them with the
/// `component` the alert rules select on, and loads deploy/alerts/trusst-cdc.rules.yml; its
/// version is the one whose promtool tests the rules.
#[test]
fn prometheus_scrapes_every_connector_and_loads_the_alert_rules() {
    let c = compose();
    let prom = service(&c, "prometheus");
    let cmd = strings(&prom["command"]);
    let config_path = cmd
        .iter()
        .find_map(|a| a.strip_prefix("--config.file="))
        .expect("--config.file");
    // The config file, read from the host through the service's bind mount.
    let (dir, file) = config_path.rsplit_once('/').unwrap();
    let (mount_dir, host_dir) = strings(&prom["volumes"])
        .iter()
        .find_map(|v| {
            let mut p = v.split(':');
            let (host, inner) = (p.next()?, p.next()?);
            dir.starts_with(inner)
                .then(|| (inner.to_owned(), host.trim_start_matches("./").to_owned()))
        })
        .expect("the config file is mounted");
    let host_config = format!("{host_dir}{}/{file}", &dir[mount_dir.len()..]);
    let config = yaml_file(&host_config);
    let mut targets = BTreeSet::new();
    for job in config["scrape_configs"].as_array().unwrap() {
        for sc in job["static_configs"].as_array().unwrap() {
            let component = sc["labels"]["component"].as_str().unwrap_or_default();
            for t in strings(&sc["targets"]) {
                assert_eq!(
                    component,
                    if t.starts_with("source:") {
                        "source"
                    } else {
                        "sink"
                    },
                    "{t}: the alert rules select on the component label"
                );
                targets.insert(t);
            }
        }
    }
    assert_eq!(
        targets,
        metrics_targets(&c),
        "{host_config}: scrape targets"
    );
    // The rule file: relative to the config file, inside the same mount.
    let rules: Vec<String> = strings(&config["rule_files"]);
    assert_eq!(rules.len(), 1, "{rules:?}");
    let host_rules = Path::new(&host_config).parent().unwrap().join(&rules[0]);
    let host_rules = Path::new(ROOT)
        .join(host_rules)
        .canonicalize()
        .expect("the rule file exists");
    assert_eq!(
        host_rules,
        Path::new(ROOT)
            .join("deploy/alerts/trusst-cdc.rules.yml")
            .canonicalize()
            .unwrap()
    );
    assert!(host_rules.starts_with(Path::new(ROOT).join(&host_dir).canonicalize().unwrap()));
    // The image is the Prometheus release of the promtool that tests the rules:
    // module version v0.MMP.P is Prometheus vM.MP.P (v0.316.0 -> v3.16.0).
    let pin = read("scripts/deploy-check.sh")
        .lines()
        .find_map(|l| l.strip_prefix("PROMTOOL_VERSION=").map(str::to_owned))
        .unwrap();
    let module = pin
        .split_whitespace()
        .next()
        .unwrap()
        .trim_start_matches("v0.");
    let (minor3, patch) = module.split_once('.').unwrap();
    let release = format!(
        "v{}.{}.{patch}",
        &minor3[..1],
        minor3[1..].parse::<u32>().unwrap()
    );
    assert_eq!(prom["image"], format!("prom/prometheus:{release}"));
}

/// Grafana provisions the Prometheus data source and the dashboard of dashboards/.
#[test]
fn grafana_has_the_dashboard_and_the_data_source() {
    let c = compose();
    let grafana = service(&c, "grafana");
    let provisioning = mount_of(grafana, "/etc/grafana/provisioning").expect("provisioning");
    let ds = yaml_file(&format!("{provisioning}/datasources/prometheus.yml"));
    let ds = &ds["datasources"][0];
    assert_eq!(ds["type"], "prometheus");
    assert_eq!(ds["isDefault"], true);
    let url = ds["url"].as_str().unwrap();
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    assert!(url.contains("//prometheus:"), "{url}");
    assert!(listening(&c)["prometheus"].contains(&port), "{url}");
    let provider = yaml_file(&format!("{provisioning}/dashboards/trusst-cdc.yml"));
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let host = mount_of(grafana, path).expect("the dashboards folder is mounted");
    let dashboard: Value =
        serde_json::from_str(&read(&format!("{host}/trusst-cdc.json"))).expect("the dashboard");
    // Its data source variable picks the provisioned (default) Prometheus.
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus")
    );
}

/// docker-compose.crm.yml points the sinks at real CRMs: each config reads its client secret
/// from a Docker secret file, never from the environment or an inline value, and the endpoints
/// come from the operator's shell.
#[test]
fn the_crm_override_takes_credentials_from_docker_secrets() {
    let base = compose();
    let over = yaml_file("docker-compose.crm.yml");
    let declared = over["secrets"].as_object().expect("top-level secrets");
    let ignored = read(".gitignore");
    for (name, secret) in declared {
        let file = secret["file"]
            .as_str()
            .unwrap_or_else(|| panic!("secret {name} comes from a file"));
        let dir = file.trim_start_matches("./").split('/').next().unwrap();
        assert!(
            ignored.lines().any(|l| l.trim_matches('/') == dir),
            "{file}: {dir}/ must be git-ignored"
        );
    }
    let mut sinks = 0;
    for (name, _) in SINKS {
        let svc = &over["services"][name];
        assert!(svc.is_object(), "docker-compose.crm.yml overrides {name}");
        // Each override applies to a service of docker-compose.yml.
        service(&base, name);
        let cmd = strings(&svc["command"]);
        let path = &cmd[cmd.iter().position(|a| a == "--config").unwrap() + 1];
        let (dir, file) = path.rsplit_once('/').unwrap();
        let host = mount_of(svc, dir).unwrap_or_else(|| panic!("{name}: {dir} is not mounted"));
        let text = read(&format!("{host}/{file}"));
        let config: trusst_cdc::sink::config::SinkConfig =
            trusst_cdc::config::parse(&text).unwrap_or_else(|e| panic!("{host}/{file}: {e}"));
        let target = config.sink.target.name();
        let table: toml::Table = toml::from_str(&text).unwrap();
        let mut refs = BTreeSet::new();
        env_refs(&toml::Value::Table(table.clone()), &mut refs);
        assert!(
            refs.is_empty(),
            "{file} reads secrets from the environment: {refs:?}"
        );
        let secret = &table[target]["client_secret"];
        assert!(secret.get("value").is_none(), "{file}: inline secret");
        let secret_file = secret["file"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: client_secret = {{ file = ... }}"));
        let secret_name = secret_file
            .strip_prefix("/run/secrets/")
            .unwrap_or_else(|| panic!("{file}: {secret_file} is not a Docker secret"));
        assert!(
            strings(&svc["secrets"]).iter().any(|s| s == secret_name),
            "{name} is not given the secret {secret_name}"
        );
        assert!(
            declared.contains_key(secret_name),
            "{secret_name} is not declared"
        );
        // Nothing in the environment carries a credential; endpoints come from the shell.
        for (var, value) in env(svc) {
            if ["SECRET", "PASSWORD", "TOKEN"]
                .iter()
                .any(|w| var.contains(w))
            {
                assert_eq!(value, "", "{name}: {var} holds a value");
            }
            if var.ends_with("_URL") && !value.is_empty() {
                assert!(
                    value.starts_with(&format!("${{{var}:?")),
                    "{name}: {var}={value} must come from the shell"
                );
            }
        }
        sinks += 1;
    }
    assert_eq!(sinks, 3);
}
