# Sourced, not run: fetches from Maven Central into a cache folder, once. Used by
# scripts/services.sh (the Kafka broker, Apicurio Registry) and scripts/bench-compare.sh (Kafka
# Connect and Debezium). Maven's own repository is $CACHE/m2 (CACHE must be set by the caller).
#
#   maven_fetch WHAT POM DEST [-Dname=value ...]
#       the runtime closure of a dependency-list pom (dependency:copy-dependencies)
#   maven_fetch_artifact WHAT DEST GROUP:ARTIFACT:VERSION[:TYPE[:CLASSIFIER]] [POST]
#       one artifact (dependency:copy); POST, a function, then runs on the folder (e.g. to unpack)
#
# WHAT names the download, versions included ("kafka 4.1.2"), in messages and in DEST/.stamp; the
# stamp also holds the pom's hash or the artifact, so editing the pom or changing a version fetches
# again instead of silently running stale files. Both return non-zero on failure: callers write
# `maven_fetch ... || die ...`.

# The shared part: run mvn with ARGS and -DoutputDirectory=<temporary folder>, then POST, and only
# then move the folder to DEST, so an interrupted fetch never leaves a half-filled DEST.
maven_fetch_into() {
    local what=$1 dest stamp=$3 post=$4
    # Absolute: Maven resolves a relative output directory against the pom's folder.
    dest=$(realpath -m "$2")
    shift 4
    if [[ -f $dest/.stamp && $(<"$dest/.stamp") == "$stamp" ]]; then
        return
    fi
    command -v mvn >/dev/null || {
        echo "maven: error: mvn not found: Maven is needed to fetch $what from Maven Central" >&2
        return 1
    }
    echo "maven: fetching $what from Maven Central (first run only)" >&2
    local tmp=$dest.tmp log=$dest.fetch.log started=$SECONDS
    rm -rf "$tmp"
    mkdir -p "$(dirname "$dest")"
    if ! mvn -B -q -Dmaven.repo.local="$CACHE/m2" "$@" -DoutputDirectory="$tmp" >"$log" 2>&1; then
        echo "maven: last lines of $log:" >&2
        tail -n 40 "$log" | sed 's/^/    /' >&2
        echo "maven: error: could not fetch $what with Maven" >&2
        return 1
    fi
    if [[ -n $post ]] && ! "$post" "$tmp"; then
        echo "maven: error: could not unpack $what (see $log)" >&2
        return 1
    fi
    # Callers test the result (`maven_fetch ... || die`), which turns off `set -e` in here.
    echo "$stamp" >"$tmp/.stamp" && rm -rf "$dest" && mv "$tmp" "$dest" || return 1
    echo "maven: fetched $(find "$dest" -type f ! -name .stamp | wc -l) files for $what in $((SECONDS - started))s" >&2
}

maven_fetch() {
    local what=$1 pom=$2 dest=$3
    shift 3
    maven_fetch_into "$what" "$dest" "$what pom $(sha256sum "$pom" | cut -c1-16)" "" \
        -f "$pom" "$@" dependency:copy-dependencies -DincludeScope=runtime
}

maven_fetch_artifact() {
    local what=$1 dest=$2 artifact=$3 post=${4:-}
    maven_fetch_into "$what" "$dest" "$what $artifact" "$post" dependency:copy -Dartifact="$artifact"
}
