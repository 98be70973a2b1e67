"""Microsoft's Dataverse SDK for Python (PowerPlatform-Dataverse-Client), unchanged, against the
emulator: sign-in through azure-identity (MSAL), upserts by alternate key one at a time and with
UpsertMultiple, creates, deletes, and the errors it turns into exceptions. Every test reads what
arrived back through the emulator's admin API."""

import time

import pytest
from azure.identity import ClientSecretCredential
from PowerPlatform.Dataverse.client import DataverseClient
from PowerPlatform.Dataverse.core.errors import HttpError
from PowerPlatform.Dataverse.models import UpsertItem

TENANT, CLIENT_ID, SECRET = "trusst-tenant", "trusst-dv-client", "trusst-dv-secret"
KEY = "trusst_contact_id"
PATCH = "PATCH /api/data/v9.2/{seg}"
UPSERT_MULTIPLE = "POST /api/data/v9.2/{seg}/Microsoft.Dynamics.CRM.UpsertMultiple"


def credential(emulator):
    # The authority is the emulator instead of login.microsoftonline.com; instance discovery
    # would ask Microsoft which authorities exist.
    return ClientSecretCredential(
        TENANT, CLIENT_ID, SECRET, authority=emulator.base, disable_instance_discovery=True
    )


@pytest.fixture
def client(emulator):
    with DataverseClient(emulator.base, credential(emulator)) as c:
        yield c


def contacts(emulator):
    return emulator.by_key("dataverse", "contact", KEY)


def test_sign_in_through_azure_identity(emulator):
    token = credential(emulator).get_token(f"{emulator.base}/.default")
    assert token.token and token.expires_on > time.time() + 3000
    assert emulator.tokens_issued("dataverse") == 1
    discovery = emulator.calls("dataverse", "GET /{tenant}/v2.0/.well-known/openid-configuration")
    assert discovery.get("200", 0) >= 1
    # The token works on the Web API.
    import requests

    r = requests.get(
        f"{emulator.base}/api/data/v9.2/WhoAmI",
        headers={"Authorization": f"Bearer {token.token}"},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["UserId"]


def test_upsert_one_record_by_alternate_key(client, emulator):
    # "Good" is a label: the SDK reads the choice columns' options from the table metadata and
    # sends the option value instead.
    client.records.upsert("contact", [UpsertItem(
        alternate_key={KEY: "dv-1"},
        record={"agentid": "A1", "quality_score": 5, "agent_identified": True, "call_outcome": "Good"},
    )])
    first = contacts(emulator)["dv-1"]
    assert (first["agentid"], first["quality_score"], first["agent_identified"]) == ("A1", 5, True)
    assert first["call_outcome"] == 100000001

    client.records.upsert("contact", [{"alternate_key": {KEY: "dv-1"}, "record": {"agentid": "A2"}}])
    rows = contacts(emulator)
    assert list(rows) == ["dv-1"]
    assert rows["dv-1"]["contactid"] == first["contactid"], "updated in place"
    assert (rows["dv-1"]["agentid"], rows["dv-1"]["call_outcome"]) == ("A2", 100000001)
    assert emulator.calls("dataverse", PATCH) == {"204": 2}


def test_upsert_several_records_with_upsert_multiple(client, emulator):
    client.records.upsert("contact", [
        {"alternate_key": {KEY: f"m-{i}"}, "record": {"quality_score": i, "call_direction": "outbound"}}
        for i in range(3)
    ])
    rows = contacts(emulator)
    assert sorted(rows) == ["m-0", "m-1", "m-2"]
    assert [rows[f"m-{i}"]["quality_score"] for i in range(3)] == [0, 1, 2]
    assert all(r["call_direction"] == 100000001 for r in rows.values())
    ids = {k: r["contactid"] for k, r in rows.items()}

    # One existing record and one new one, again in one request.
    client.records.upsert("contact", [
        UpsertItem(alternate_key={KEY: "m-1"}, record={"agentid": "again"}),
        UpsertItem(alternate_key={KEY: "m-3"}, record={"agentid": "new"}),
    ])
    rows = contacts(emulator)
    assert sorted(rows) == ["m-0", "m-1", "m-2", "m-3"]
    assert (rows["m-1"]["agentid"], rows["m-1"]["contactid"]) == ("again", ids["m-1"])
    assert emulator.calls("dataverse", UPSERT_MULTIPLE) == {"204": 2}
    assert emulator.calls("dataverse", PATCH) == {}


def test_upsert_multiple_is_all_or_nothing(client, emulator):
    client.records.upsert("contact", [UpsertItem(alternate_key={KEY: "a-1"}, record={"agentid": "before"})])
    with pytest.raises(HttpError) as err:
        client.records.upsert("contact", [
            UpsertItem(alternate_key={KEY: "a-1"}, record={"agentid": "after"}),
            UpsertItem(alternate_key={KEY: "a-2"}, record={"quality_score": "lots"}),
        ])
    assert err.value.status_code == 400
    assert err.value.details["service_error_code"] == "0x80048d19"
    assert "Edm.Int32" in err.value.message
    rows = contacts(emulator)
    assert list(rows) == ["a-1"] and rows["a-1"]["agentid"] == "before", "nothing was written"


def test_create_and_delete(client, emulator):
    guid = client.records.create("contact", {KEY: "new-1", "agentid": "N"})
    rows = contacts(emulator)
    assert rows["new-1"]["contactid"] == guid
    assert client.records.retrieve("contact", guid)["agentid"] == "N"

    guids = client.records.create("contact", [{KEY: "new-2"}, {KEY: "new-3", "quality_score": 3}])
    rows = contacts(emulator)
    assert [rows["new-2"]["contactid"], rows["new-3"]["contactid"]] == guids
    assert rows["new-3"]["quality_score"] == 3

    client.records.delete("contact", guid)
    client.records.delete("contact", f"{KEY}='new-2'")
    assert list(contacts(emulator)) == ["new-3"]


def test_throttling_reaches_the_caller_with_retry_after(client, emulator):
    item = UpsertItem(alternate_key={KEY: "t-1"}, record={"agentid": "x"})
    client.records.upsert("contact", [item])  # metadata read and cached before the fault
    emulator.faults({"dataverse": {"burst_429": 1}})
    with pytest.raises(HttpError) as err:
        client.records.upsert("contact", [item])
    assert (err.value.status_code, err.value.is_transient) == (429, True)
    assert err.value.details["retry_after"] == 1
    assert err.value.details["service_error_code"] == "0x80072322"
    client.records.upsert("contact", [item])
    assert contacts(emulator)["t-1"]["agentid"] == "x"
