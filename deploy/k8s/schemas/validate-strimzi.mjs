// Validates Strimzi resources against the schema of the Strimzi CRDs, as packaged by @kubernetes-models.
// Input: a JSON array of resources on stdin. Output: a JSON array with one list of error strings per resource.
import { readFileSync } from "node:fs";

const kinds = {
  "kafka.strimzi.io/v1beta2/KafkaTopic": "@kubernetes-models/strimzi-kafka-operator/kafka.strimzi.io/v1beta2/KafkaTopic",
  "kafka.strimzi.io/v1/KafkaTopic": "@kubernetes-models/strimzi-kafka-operator/kafka.strimzi.io/v1/KafkaTopic",
};
const docs = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const doc of docs) {
  const module = kinds[`${doc.apiVersion}/${doc.kind}`];
  if (!module) {
    results.push([`no Strimzi schema for ${doc.apiVersion} ${doc.kind}`]);
    continue;
  }
  const { [doc.kind]: Model } = await import(module);
  try {
    new Model(doc).validate();
    results.push([]);
  } catch (err) {
    results.push([String(err.message)]);
  }
}
process.stdout.write(JSON.stringify(results));
