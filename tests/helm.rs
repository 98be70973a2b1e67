//! The Helm chart (deploy/helm/trusst-cdc), rendered with `helm template` for the values files in
//! its ci/ folder, no cluster needed: what a deployment depends on holds in what it renders.
//! Probes on the metrics server's real paths and port; credentials only from Secrets; configs
//! that the connector itself loads; one source per replication slot; sink replicas within the
//! topic's partitions; nothing kept on the pods; the ServiceMonitor and the PrometheusRule valid
//! against their CRD schema (tests/helm/*.schema.json) and the rule file shipped unchanged.
//!
//! helm is the binary scripts/deploy-check.sh builds into .cache/tools/bin (`HELM` overrides);
//! scripts/test.sh runs that script first. kubernetes-validate, run by the same script, checks
//! the built-in kinds against the Kubernetes schemas.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;
use trusst_cdc::config::{SourceConfig, SourceOverrides};
use trusst_cdc::sink::config::{SinkConfig, SinkOverrides};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CHART: &str = "deploy/helm/trusst-cdc";
const VALUES: [&str; 2] = ["one-customer", "three-customers"];

fn helm() -> PathBuf {
    let bin = std::env::var_os("HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(ROOT).join(".cache/tools/bin/helm"));
    assert!(
        bin.is_file(),
        "no helm at {}: run scripts/deploy-check.sh tools (it builds helm from the Go module proxy once)",
        bin.display()
    );
    bin
}

/// `helm template` of the chart with a ci/ values file and `--set` overrides: the manifests, or
/// helm's error.
fn try_render(values: &str, set: &[&str]) -> Result<Vec<Value>, String> {
    let mut cmd = Command::new(helm());
    cmd.current_dir(ROOT).args([
        "template",
        "trusst-cdc",
        CHART,
        "--namespace",
        "trusst",
        "--kube-version",
        "1.33.0",
        "-f",
        &format!("{CHART}/ci/{values}-values.yaml"),
    ]);
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("running helm");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).expect("helm renders YAML");
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn render(values: &str, set: &[&str]) -> Vec<Value> {
    try_render(values, set).unwrap_or_else(|e| panic!("helm template {values}: {e}"))
}

fn render_err(values: &str, set: &[&str]) -> String {
    match try_render(values, set) {
        Ok(_) => panic!("helm template {values} with {set:?} should fail"),
        Err(e) => e,
    }
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn name(d: &Value) -> &str {
    d["metadata"]["name"].as_str().unwrap()
}

fn label<'a>(d: &'a Value, key: &str) -> &'a str {
    d["metadata"]["labels"][key].as_str().unwrap_or_default()
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// The TOML config file a Deployment runs (`--config <mount>/<file>`), from its ConfigMap.
fn config_of(docs: &[Value], deployment: &Value) -> toml::Table {
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = array(&container["args"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let (dir, file) = path.rsplit_once('/').unwrap();
    let mount = array(&container["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {dir}", name(deployment)));
    let volume = array(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let cm_name = volume["configMap"]["name"].as_str().expect("a ConfigMap");
    let cm = of_kind(docs, "ConfigMap")
        .into_iter()
        .find(|c| name(c) == cm_name)
        .unwrap_or_else(|| panic!("no ConfigMap {cm_name}"));
    let text = cm["data"][file]
        .as_str()
        .unwrap_or_else(|| panic!("{cm_name} has no {file}"));
    toml::from_str(text).unwrap_or_else(|e| panic!("{cm_name}/{file} is not TOML: {e}\n{text}"))
}

fn containers(d: &Value) -> &[Value] {
    array(&d["spec"]["template"]["spec"]["containers"])
}

/// The metrics server's routes, read from its source, so the probes follow the code.
fn served_paths() -> BTreeSet<String> {
    let src = std::fs::read_to_string(Path::new(ROOT).join("src/metrics/server.rs")).unwrap();
    src.match_indices(".route(\"")
        .map(|(i, m)| {
            let rest = &src[i + m.len()..];
            rest[..rest.find('"').unwrap()].to_owned()
        })
        .collect()
}

#[test]
fn every_container_has_liveness_and_readiness_on_the_metrics_server() {
    let paths = served_paths();
    assert!(
        paths.contains("/health") && paths.contains("/ready"),
        "{paths:?}"
    );
    for values in VALUES {
        let docs = render(values, &[]);
        let deployments = of_kind(&docs, "Deployment");
        assert!(deployments.len() >= 2, "{values}: {}", deployments.len());
        for d in deployments {
            let config = config_of(&docs, d);
            let listen = config["metrics"]["listen"].as_str().unwrap();
            let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
            assert!(
                listen.starts_with("0.0.0.0:"),
                "{}: the kubelet must reach {listen}",
                name(d)
            );
            for c in containers(d) {
                let ports = array(&c["ports"]);
                assert!(
                    ports
                        .iter()
                        .any(|p| p["name"] == "metrics" && p["containerPort"] == port),
                    "{}: port metrics = {port}: {ports:?}",
                    name(d)
                );
                for (probe, path) in [
                    ("livenessProbe", "/health"),
                    ("readinessProbe", "/ready"),
                    ("startupProbe", "/health"),
                ] {
                    let get = &c[probe]["httpGet"];
                    assert_eq!(get["path"], path, "{}: {probe}: {}", name(d), c[probe]);
                    assert_eq!(get["port"], "metrics", "{}: {probe}", name(d));
                    assert!(paths.contains(path));
                }
            }
        }
    }
}

/// An environment variable that carries a credential.
fn is_credential(var: &str) -> bool {
    [
        "SECRET",
        "PASSWORD",
        "TOKEN",
        "USERNAME",
        "DATABASE_URL",
        "KEY",
    ]
    .iter()
    .any(|w| var.contains(w))
}

/// `{ env = "X" }` and `{ file = "P" }` secrets in a config, and credential keys given inline.
fn secret_refs(
    v: &toml::Value,
    path: &str,
    env: &mut BTreeSet<String>,
    files: &mut BTreeSet<String>,
    inline: &mut Vec<String>,
) {
    let credential = |k: &str| {
        [
            "client_secret",
            "private_key",
            "password",
            "token",
            "database_url",
        ]
        .iter()
        .any(|w| k.ends_with(w))
            || k == "sasl.password"
    };
    if let toml::Value::Table(t) = v {
        for (k, v) in t {
            let at = format!("{path}.{k}");
            match v {
                toml::Value::Table(s) if credential(k) => {
                    if let Some(e) = s.get("env").and_then(toml::Value::as_str) {
                        env.insert(e.to_owned());
                    } else if let Some(f) = s.get("file").and_then(toml::Value::as_str) {
                        files.insert(f.to_owned());
                    } else {
                        inline.push(at);
                    }
                }
                toml::Value::Table(_) => secret_refs(v, &at, env, files, inline),
                _ if credential(k) => inline.push(at),
                _ => {}
            }
        }
    }
}

#[test]
fn credentials_come_only_from_secrets() {
    for values in VALUES {
        let docs = render(values, &[]);
        for d in of_kind(&docs, "Deployment") {
            let config = config_of(&docs, d);
            let (mut env, mut files, mut inline) = Default::default();
            secret_refs(
                &toml::Value::Table(config.clone()),
                "",
                &mut env,
                &mut files,
                &mut inline,
            );
            assert!(
                inline.is_empty(),
                "{}: credentials inline: {inline:?}",
                name(d)
            );
            let c = &containers(d)[0];
            let vars: BTreeMap<&str, &Value> = array(&c["env"])
                .iter()
                .map(|e| (e["name"].as_str().unwrap(), e))
                .collect();
            // No value: on anything that is a credential; each comes from a Secret.
            for (var, e) in &vars {
                if is_credential(var) {
                    assert!(
                        e.get("value").is_none(),
                        "{}: {var} has an inline value",
                        name(d)
                    );
                    let r = &e["valueFrom"]["secretKeyRef"];
                    assert!(
                        r["name"].is_string() && r["key"].is_string(),
                        "{}: {var} must come from a Secret (valueFrom.secretKeyRef): {e}",
                        name(d)
                    );
                }
            }
            // Every secret the config reads from the environment is such a variable.
            for var in &env {
                let e = vars.get(var.as_str()).unwrap_or_else(|| {
                    panic!("{}: the config reads {var}, which is not set", name(d))
                });
                assert!(
                    e["valueFrom"]["secretKeyRef"].is_object(),
                    "{}: {var}: {e}",
                    name(d)
                );
            }
            // Every secret file is in a mounted Secret volume.
            let pod = &d["spec"]["template"]["spec"];
            for file in &files {
                let mount = array(&c["volumeMounts"])
                    .iter()
                    .find(|m| file.starts_with(m["mountPath"].as_str().unwrap()))
                    .unwrap_or_else(|| panic!("{}: nothing mounted over {file}", name(d)));
                let volume = array(&pod["volumes"])
                    .iter()
                    .find(|v| v["name"] == mount["name"])
                    .unwrap();
                let item = file
                    .strip_prefix(mount["mountPath"].as_str().unwrap())
                    .unwrap()
                    .trim_start_matches('/');
                assert!(
                    array(&volume["secret"]["items"])
                        .iter()
                        .any(|i| i["path"] == item),
                    "{}: {file} is not a key of the Secret volume {volume}",
                    name(d)
                );
            }
            // A database URL carries its password: only from a Secret, never in the config.
            if label(d, "app.kubernetes.io/component") == "source" {
                assert!(
                    config
                        .get("database")
                        .and_then(|db| db.get("url"))
                        .is_none(),
                    "{}",
                    name(d)
                );
                let from_aws = config
                    .get("database")
                    .and_then(|db| db.get("secret"))
                    .is_some();
                assert!(
                    from_aws || vars.contains_key("DATABASE_URL"),
                    "{}: no database credentials",
                    name(d)
                );
            }
        }
        // No Secret objects either: the chart names Secrets, it never holds their values.
        assert!(of_kind(&docs, "Secret").is_empty(), "{values}");
    }
    // The three-customer file uses every kind of credential the chart offers.
    let docs = render("three-customers", &[]);
    let all_env: BTreeSet<String> = of_kind(&docs, "Deployment")
        .iter()
        .flat_map(|d| array(&containers(d)[0]["env"]).to_vec())
        .filter_map(|e| e["name"].as_str().map(str::to_owned))
        .collect();
    for var in [
        "CRM_CLIENT_SECRET",
        "TRUSST_AUDIT_DATABASE_URL",
        "KAFKA_SASL_PASSWORD",
        "SCHEMA_REGISTRY_PASSWORD",
        "DATABASE_URL",
    ] {
        assert!(all_env.contains(var), "{var} not used: {all_env:?}");
    }
}

#[test]
fn inline_credentials_and_pod_local_state_are_refused() {
    for (set, want) in [
        (
            "customers[0].sinks[0].config.salesforce.client_secret=s3cret",
            "credentials come from Secrets only",
        ),
        (
            "customers[0].sinks[0].config.audit.database_url=postgres://u:p@h/db",
            "credentials come from Secrets only",
        ),
        (
            "customers[0].database.url=postgres://u:p@h/db",
            "put it in a Secret",
        ),
        ("kafka.properties.sasl\\.password=s3cret", "is a credential"),
        (
            "schemaRegistry.url=https://key:s3cret@registry.example",
            "carries credentials",
        ),
        ("source.config.state_store=file", "lost when it moves"),
    ] {
        let e = render_err("one-customer", &[set]);
        assert!(e.contains(want), "{set}: {e}");
        assert!(!e.contains("s3cret"), "the error repeats the secret: {e}");
    }
}

/// The connector loads every rendered config: the same parser (unknown keys refused) and the
/// same checks as `trusst-cdc source` and `trusst-cdc sink`.
#[test]
fn rendered_configs_load_in_the_connector() {
    for values in VALUES {
        let docs = render(values, &[]);
        for d in of_kind(&docs, "Deployment") {
            let text = toml::to_string(&config_of(&docs, d)).unwrap();
            match label(d, "app.kubernetes.io/component") {
                "source" => {
                    let cfg: SourceConfig = trusst_cdc::config::parse(&text)
                        .unwrap_or_else(|e| panic!("{}: {e}\n{text}", name(d)));
                    let overrides = SourceOverrides {
                        // What DATABASE_URL would hold, when the URL comes from a Secret.
                        database_url: cfg
                            .database
                            .secret
                            .is_none()
                            .then(|| "postgres://trusst_cdc:pw@db.example:5432/trusst".into()),
                        ..Default::default()
                    };
                    let cfg = cfg
                        .resolve(overrides)
                        .unwrap_or_else(|e| panic!("{}: {e}\n{text}", name(d)));
                    assert_eq!(
                        cfg.source.state_store,
                        trusst_cdc::config::StateStore::Kafka
                    );
                    assert_eq!(cfg.source.slot, label(d, "trusst-cdc/slot"));
                    // Every event names the customer whose database it came from.
                    assert_eq!(cfg.customer(), label(d, "trusst-cdc/customer"));
                }
                "sink" => {
                    let cfg: SinkConfig = trusst_cdc::config::parse(&text)
                        .unwrap_or_else(|e| panic!("{}: {e}\n{text}", name(d)));
                    let cfg = cfg
                        .resolve(SinkOverrides::default())
                        .unwrap_or_else(|e| panic!("{}: {e}\n{text}", name(d)));
                    assert_eq!(cfg.sink.name, label(d, "trusst-cdc/sink"));
                    // A sink writes only its own customer's records.
                    assert_eq!(cfg.sink.customers, [label(d, "trusst-cdc/customer")]);
                }
                other => panic!("{}: component {other:?}", name(d)),
            }
        }
    }
}

#[test]
fn one_source_per_slot_and_sink_replicas_within_the_partitions() {
    for values in VALUES {
        let docs = render(values, &[]);
        let mut per_slot: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        let mut partitions: BTreeMap<String, i64> = BTreeMap::new();
        for d in of_kind(&docs, "Deployment") {
            let config = config_of(&docs, d);
            if label(d, "app.kubernetes.io/component") == "source" {
                let slot = config["source"]["slot"].as_str().unwrap().to_owned();
                per_slot.entry(slot).or_default().push(name(d));
                // By default a second replica stands by for the slot, on another node where
                // it can, and a frozen one gives the slot up after takeover_after.
                assert_eq!(
                    d["spec"]["replicas"],
                    2,
                    "{}: one reader and one standby",
                    name(d)
                );
                assert_eq!(
                    config["source"]["takeover_after"].as_str(),
                    Some("30s"),
                    "{}",
                    name(d)
                );
                let anti = &d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
                assert_eq!(
                    anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"],
                    "kubernetes.io/hostname",
                    "{}: the standby on another node",
                    name(d)
                );
                assert_eq!(
                    d["spec"]["strategy"]["type"],
                    "Recreate",
                    "{}: a rollout must not start a second reader beside the first",
                    name(d)
                );
                partitions.insert(
                    config["kafka"]["topic"].as_str().unwrap().to_owned(),
                    config["kafka"]["partitions"].as_integer().unwrap(),
                );
            }
        }
        assert!(!per_slot.is_empty());
        for (slot, sources) in &per_slot {
            assert_eq!(
                sources.len(),
                1,
                "{values}: slot {slot} read by {sources:?}"
            );
        }
        for d in of_kind(&docs, "Deployment") {
            if label(d, "app.kubernetes.io/component") != "sink" {
                continue;
            }
            let topic = config_of(&docs, d)["kafka"]["topic"]
                .as_str()
                .unwrap()
                .to_owned();
            let replicas = d["spec"]["replicas"].as_i64().unwrap();
            let p = partitions[&topic];
            assert!(
                (1..=p).contains(&replicas),
                "{}: {replicas} replicas for {p} partitions",
                name(d)
            );
        }
    }
    // The chart refuses more sink replicas than partitions, and a slot shared by two customers.
    let e = render_err("one-customer", &["customers[0].sinks[0].replicas=7"]);
    assert!(e.contains("more than the topic's 6 partitions"), "{e}");
    let e = render_err(
        "three-customers",
        &["customers[1].source.slot=trusst_cdc_acme"],
    );
    assert!(e.contains("a slot admits one source"), "{e}");
    // Without the standby: the one reader the slot admits, and the server's wal_sender_timeout.
    let docs = render("one-customer", &["source.standby=false"]);
    let source = of_kind(&docs, "Deployment")
        .into_iter()
        .find(|d| label(d, "app.kubernetes.io/component") == "source")
        .unwrap();
    assert_eq!(source["spec"]["replicas"], 1);
    assert!(
        config_of(&docs, source)["source"]
            .get("takeover_after")
            .is_none()
    );
    assert!(source["spec"]["template"]["spec"].get("affinity").is_none());
}

/// The stream position lives in the slot, the snapshot progress in Kafka (`<topic>.state`), the
/// sinks' offsets in their groups: a pod keeps nothing that moving it would lose.
#[test]
fn no_state_is_kept_on_the_pods() {
    for values in VALUES {
        let docs = render(values, &[]);
        for kind in ["PersistentVolumeClaim", "StatefulSet"] {
            assert!(of_kind(&docs, kind).is_empty(), "{values}: a {kind}");
        }
        for d in of_kind(&docs, "Deployment") {
            for v in array(&d["spec"]["template"]["spec"]["volumes"]) {
                assert!(
                    ["configMap", "emptyDir", "secret"]
                        .iter()
                        .any(|k| v.get(*k).is_some()),
                    "{}: volume {v}",
                    name(d)
                );
            }
            let config = config_of(&docs, d);
            if let Some(store) = config.get("source").and_then(|s| s.get("state_store")) {
                assert_eq!(store.as_str(), Some("kafka"), "{}", name(d));
            }
        }
    }
}

fn validator(file: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(Path::new(ROOT).join("tests/helm").join(file)).unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

#[test]
fn servicemonitor_and_prometheusrule_follow_their_crd_schema() {
    let docs = render("three-customers", &[]);
    let monitors = of_kind(&docs, "ServiceMonitor");
    let rules = of_kind(&docs, "PrometheusRule");
    assert_eq!((monitors.len(), rules.len()), (1, 1));
    let sm = validator("servicemonitor.schema.json");
    let pr = validator("prometheusrule.schema.json");
    if let Err(e) = sm.validate(monitors[0]) {
        panic!("ServiceMonitor: {e}: {}", monitors[0]);
    }
    if let Err(e) = pr.validate(rules[0]) {
        panic!("PrometheusRule: {e}");
    }
    // The schemas do refuse what the operator's CRD refuses.
    let mut bad = monitors[0].clone();
    bad["spec"]["endpoints"][0]["interval"] = "thirty seconds".into();
    assert!(sm.validate(&bad).is_err());
    let mut bad = rules[0].clone();
    bad["spec"]["groups"][0]["rules"][0]["severity"] = "page".into();
    assert!(pr.validate(&bad).is_err());

    // The ServiceMonitor selects every metrics Service of the release, on its metrics port.
    let selector = monitors[0]["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    let services = of_kind(&docs, "Service");
    assert_eq!(services.len(), of_kind(&docs, "Deployment").len());
    for s in services {
        for (k, v) in selector {
            assert_eq!(
                &s["metadata"]["labels"][k],
                v,
                "{} is not selected",
                name(s)
            );
        }
        assert!(
            array(&s["spec"]["ports"])
                .iter()
                .any(|p| p["name"] == "metrics")
        );
    }
    assert_eq!(monitors[0]["spec"]["endpoints"][0]["port"], "metrics");
    // It gives the targets the `component` label the alert rules select on.
    assert!(
        array(&monitors[0]["spec"]["endpoints"][0]["relabelings"])
            .iter()
            .any(|r| r["targetLabel"] == "component")
    );

    // The PrometheusRule carries deploy/alerts/trusst-cdc.rules.yml unchanged.
    let file: Value = serde_norway::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/alerts/trusst-cdc.rules.yml"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(rules[0]["spec"], file);

    // Without the switches, neither is rendered (clusters without the Prometheus Operator).
    let plain = render("one-customer", &[]);
    assert!(of_kind(&plain, "ServiceMonitor").is_empty());
    assert!(of_kind(&plain, "PrometheusRule").is_empty());
}
