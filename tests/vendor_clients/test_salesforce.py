"""simple-salesforce, unchanged, against the emulator: the real login code (client credentials and
JWT bearer), upsert by external id, sObject Collections through `restful`, describe, delete by
Id, a Bulk API 2.0 upsert, and a new login when the session expires. Every test reads what
arrived back through the emulator's admin API."""

import re

import pytest
import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceResourceNotFound

from conftest import ROOT

CLIENT_ID, SECRET = "trusst-sf-client", "trusst-sf-secret"
JWT_USER = "integration@trusst.example"
EXT = "Trusst_Contact_ID__c"


def to_emulator(base):
    """A session that sends what the library addresses to `https://*.salesforce.com` (the login
    host it hard-codes) to the emulator. After login the library uses the token's
    `instance_url`, which is the emulator's own, so only the login is redirected."""

    class ToEmulator(requests.Session):
        def request(self, method, url, *args, **kwargs):
            url = re.sub(r"^https://[^/]+\.salesforce\.com", base, url)
            return super().request(method, url, *args, **kwargs)

    return ToEmulator()


@pytest.fixture
def sf(emulator):
    return Salesforce(
        consumer_key=CLIENT_ID, consumer_secret=SECRET, domain="trusst.my",
        session=to_emulator(emulator.base),
    )


def stored(emulator):
    return emulator.by_key("salesforce", "Contact", EXT)


def test_client_credentials_login(sf, emulator):
    assert sf.base_url == f"{emulator.base}/services/data/v59.0/"
    assert emulator.tokens_issued("salesforce") == 1
    assert sf.limits()["DailyApiRequests"]["Max"] == 15000
    # Sforce-Limit-Info, read on every answer.
    assert sf.api_usage["api-usage"].total == 15000


def test_jwt_bearer_login(emulator):
    sf = Salesforce(
        username=JWT_USER, consumer_key=CLIENT_ID,
        privatekey_file=str(ROOT / "tests" / "fixtures" / "jwt" / "private.pem"),
        session=to_emulator(emulator.base),
    )
    assert sf.base_url.startswith(emulator.base)
    assert sf.Contact.upsert(f"{EXT}/jwt-1", {"Agent_ID__c": "J"}) == 201
    assert stored(emulator)["jwt-1"]["Agent_ID__c"] == "J"


def test_upsert_by_external_id(sf, emulator):
    fields = {"Agent_ID__c": "A1", "Call_Outcome__c": "Good", "Quality_Score__c": 8.5,
              "Agent_Identified__c": True}
    assert sf.Contact.upsert(f"{EXT}/sf-1", fields) == 201
    assert sf.Contact.upsert(f"{EXT}/sf-1", {"Agent_ID__c": "A2"}) == 200
    rows = stored(emulator)
    assert list(rows) == ["sf-1"]
    row = rows["sf-1"]
    assert (row["Agent_ID__c"], row["Call_Outcome__c"], row["Quality_Score__c"],
            row["Agent_Identified__c"]) == ("A2", "Good", 8.5, True)


def test_collections_upsert_through_restful(sf, emulator):
    records = [
        {"attributes": {"type": "Contact"}, EXT: "c-1", "Call_Direction__c": "inbound"},
        {"attributes": {"type": "Contact"}, EXT: "c-2", "Call_Direction__c": "sideways"},
        {"attributes": {"type": "Contact"}, EXT: "c-3", "Agent_ID__c": "x"},
    ]
    results = sf.restful(
        f"composite/sobjects/Contact/{EXT}", method="PATCH",
        json={"allOrNone": False, "records": records},
    )
    assert [r["success"] for r in results] == [True, False, True]
    assert results[1]["errors"][0]["statusCode"] == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    rows = stored(emulator)
    assert sorted(rows) == ["c-1", "c-3"]
    assert rows["c-1"]["Id"] == results[0]["id"]
    assert rows["c-1"]["Call_Direction__c"] == "inbound"


def test_describe(sf):
    fields = {f["name"]: f for f in sf.Contact.describe()["fields"]}
    assert fields[EXT]["externalId"] is True
    assert [v["value"] for v in fields["Call_Outcome__c"]["picklistValues"]] == [
        "Excellent", "Good", "Fair", "Poor"]
    assert fields["Quality_Score__c"]["type"] == "double"


def test_delete_by_id(sf, emulator):
    sf.Contact.upsert(f"{EXT}/d-1", {"Agent_ID__c": "gone soon"})
    sf.Contact.upsert(f"{EXT}/d-2", {"Agent_ID__c": "stays"})
    record_id = sf.Contact.get_by_custom_id(EXT, "d-1")["Id"]
    assert stored(emulator)["d-1"]["Id"] == record_id
    assert sf.Contact.delete(record_id) == 204
    assert sorted(stored(emulator)) == ["d-2"]
    with pytest.raises(SalesforceResourceNotFound):
        sf.Contact.get(record_id)


def test_bulk_api_2_upsert(sf, emulator):
    rows = [
        {EXT: "b-1", "Agent_ID__c": "one", "Call_Outcome__c": "Fair"},
        {EXT: "b-2", "Agent_ID__c": "two", "Call_Outcome__c": "Great"},
        {EXT: "b-3", "Agent_ID__c": "three", "Call_Outcome__c": "Poor"},
    ]
    [summary] = sf.bulk2.Contact.upsert(records=rows, external_id_field=EXT, wait=0.2)
    assert (summary["numberRecordsProcessed"], summary["numberRecordsFailed"]) == (3, 1)
    job = summary["job_id"]
    ok = sf.bulk2.Contact.get_successful_records(job)
    assert ok.splitlines()[0].startswith('"sf__Id","sf__Created"') and ok.count("\n") == 3
    failed = sf.bulk2.Contact.get_failed_records(job)
    assert "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST" in failed and '"b-2"' in failed
    assert sf.bulk2.Contact.get_unprocessed_records(job).count("\n") == 1  # the header only
    stored_rows = stored(emulator)
    assert sorted(stored_rows) == ["b-1", "b-3"]
    assert (stored_rows["b-1"]["Agent_ID__c"], stored_rows["b-3"]["Call_Outcome__c"]) == ("one", "Poor")


def test_an_expired_session_logs_in_again(sf, emulator):
    sf.Contact.upsert(f"{EXT}/e-1", {"Agent_ID__c": "before"})
    emulator.action("expire-tokens")
    # The 401's body is a JSON array with INVALID_SESSION_ID: that is what makes the library
    # log in again and resend.
    assert sf.Contact.upsert(f"{EXT}/e-1", {"Agent_ID__c": "after"}) == 200
    assert emulator.tokens_issued("salesforce") == 2
    assert stored(emulator)["e-1"]["Agent_ID__c"] == "after"
